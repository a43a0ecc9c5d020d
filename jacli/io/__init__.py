"""Reading input arrays and writing results (.npy/.npz/.h5/stdin/stdout), atomically."""
