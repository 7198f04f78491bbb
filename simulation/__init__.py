"""The runnable side of flwr-splitfed, kept out of the installed library: the Flower app
(:mod:`simulation.app`), its launchers (:mod:`simulation.launch`), the benchmark
(:mod:`simulation.benchmark`) and the privacy audit (:mod:`simulation.audit`)."""
