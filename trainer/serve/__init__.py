"""The serving stage: mnist-serve (a Ray Serve app with hot swap) and mnist-predict (files on the command line)."""
