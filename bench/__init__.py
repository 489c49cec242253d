import sharding  # noqa: F401  (first: no libtpu start-up noise without TPU chips, see sharding/platforms.py)
