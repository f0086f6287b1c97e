"""The Supervisely instance's REST API as blobfs uses it: calls turned into plain records.

A client, not a transport: it speaks the server's JSON over :mod:`blobfs.transport.http`
(which only moves bytes and knows no Supervisely call), and its blob readers are
:mod:`blobfs.transport.ranged` readers.
"""
