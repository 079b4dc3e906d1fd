"""The ground every stage stands on: user errors, atomic writes, filesystems, logs, clocks, locks, provenance. Standard library, pyarrow and psutil at import (TensorFlow and Ray only inside the functions that
need them); nothing here knows about MNIST."""
