"""The kit the tests and the benchmarks share: mounts (``harness``), durability trials
(``crash``), and blobfs's own fixtures (sample images, the hostile-project corpus, large
projects).

The fixtures build projects with blobfs's packer and offsets writer, so they live with the
tests, not in the installed package. ``sample`` needs only the runtime dependencies: ``make
demo`` runs it (``python -m tests.support.sample``) without the test extra.
"""
