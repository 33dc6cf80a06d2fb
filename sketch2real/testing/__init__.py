"""Builders of models for tests, benchmarks and the demo, apart from the runtime library: tiny offline models of
every kind the project loads (`tiny`, one table of shapes, `SD_SIZES`), the tiny base that has learned something
(`pretrain`), and their command line (`python -m sketch2real.testing.build`)."""
