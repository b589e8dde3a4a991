# Generated package directory: contents are produced by tools/gen_proto.py.
