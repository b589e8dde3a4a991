"""The CRI v1 gRPC front: thin servicers that convert between proto and the model."""
