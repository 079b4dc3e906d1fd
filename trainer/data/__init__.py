"""The data stage: MNIST from its sources, validated, written once as Parquet shards; each worker's share streamed; the checks on arriving data. No Ray;
TensorFlow only to download MNIST when no source is given."""
