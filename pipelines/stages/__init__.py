"""One file per stage, each defining ``STAGE``. A stage file imports the library (``retrievers``)
and the executor's contract, never another stage. Heavy imports stay inside ``run``."""
