"""The mounted tree: Supervisely layout built from a source's records, with no FUSE in it.

Everything a FUSE operation needs (attributes, listings, open handles, reads) is a plain
method here, so the semantics are tested in-process without a kernel; the FUSE layer only
adapts arguments and turns exceptions into errno values.
"""
