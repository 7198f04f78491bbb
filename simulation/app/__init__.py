"""The Flower app: SplitFed on a task of the run config's choosing, evaluated centrally and on
the clients (``flwr run .`` from the repository's root)."""
