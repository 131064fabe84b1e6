"""seqcls: an example of bringing your own LightningModule and LightningDataModule to ``lightreg-train``.

A small Transformer encoder classifies generated token sequences (which of three marker tokens occurs most often).
Nothing here knows about lightreg: the app adds the ``Regularizer`` and the ``WeightMonitor`` from outside.
"""
