"""The app's models: one LightningModule for both tasks, with a linear, MLP or small CNN body.

Classification minimises cross-entropy and reports accuracy; regression minimises MSE and reports MSE
and R². Metrics are torchmetrics objects logged once per epoch as ``train/...``, ``val/...`` and
``test/...``. No penalty appears here: ``lightreg.Regularizer`` adds it from outside.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import Tensor, nn

from lightreg.app.arguments import check_mlp, check_task_model

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class TaskModel(pl.LightningModule):
    """Wraps ``self.net`` (built by a subclass) with the loss, metrics and optimizer of ``task``.

    Args:
        task: ``"classification"`` or ``"regression"`` (the app takes it from the data).
        in_features: input width; ``num_outputs``: classes, or 1; ``input_shape``: one example's shape.
        optimizer: ``sgd``, ``adam`` or ``adamw``; ``lr``: its learning rate (also the proximal step).
        weight_decay: the optimizer's own decay; keep 0 when a penalty with an L2 part is on.
        momentum: SGD momentum.
    """

    def __init__(
        self,
        task: str,
        in_features: int,
        num_outputs: int,
        input_shape: Sequence[int] | None = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
    ) -> None:
        super().__init__()
        check_task_model(task, optimizer, lr, weight_decay, momentum)
        self.task, self.optimizer_name, self.lr = task, optimizer, lr
        self.weight_decay, self.momentum = weight_decay, momentum
        self.in_features, self.num_outputs = in_features, num_outputs
        self.input_shape = tuple(input_shape) if input_shape is not None else (in_features,)
        # What CoupledGroupLasso and shrink trace the model on (Lightning's own name for a model's example input).
        self.example_input_array = torch.zeros(2, in_features)
        # ModuleDict keys cannot be "train" (a Module method), hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_": self._stage_metrics() for stage in ("train", "val", "test")})

    def _stage_metrics(self) -> torchmetrics.MetricCollection:
        if self.task == "classification":
            return torchmetrics.MetricCollection({"acc": torchmetrics.Accuracy("multiclass", num_classes=self.num_outputs)})
        return torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError(), "r2": torchmetrics.R2Score()})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        metrics = self.metrics[f"{stage}_"]
        metrics.update(out.argmax(dim=1) if self.task == "classification" else out.squeeze(1), y if y.ndim == 1 else y.squeeze(1))
        # Epoch-level only: one reduction per epoch under DDP, never one per step.
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "test", sync_dist=True,
                 batch_size=len(x))
        self.log_dict({f"{stage}/{k}": m for k, m in metrics.items()}, on_step=False, on_epoch=True, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = self.momentum
        return OPTIMIZERS[self.optimizer_name](self.parameters(), **kwargs)

    def configure_model(self) -> None:
        # Only ModelParallelStrategy (strategy=fsdp2_cpu) sets a device mesh: shard each layer, then the root.
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):  # fit sharded it already; test calls this hook again
            return
        dp_mesh = mesh["data_parallel"]
        for module in self.net.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fully_shard(module, mesh=dp_mesh)
        fully_shard(self.net, mesh=dp_mesh)

    def input_weight(self) -> Tensor:
        """The first layer's weight as ``(out, in_features)``: column ``j`` is what feature ``j`` feeds in."""
        first = next(m for m in self.net.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        return first.weight.reshape(first.weight.shape[0], -1)


class Linear(TaskModel):
    """Logistic (classification) or linear (regression) regression: one ``nn.Linear`` named ``net.0``.

    ``zero_init=True`` starts from ``w = 0, b = 0``, the usual start of a convex solver: ISTA from zero
    reaches the lasso optimum in a few hundred steps, where a random start would wait on the slowest,
    most correlated directions.
    """

    def __init__(self, zero_init: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(self.in_features, self.num_outputs))
        if zero_init:
            nn.init.zeros_(self.net[0].weight)
            nn.init.zeros_(self.net[0].bias)


class MLP(TaskModel):
    """``depth`` hidden layers of ``width`` units (Linear, activation, dropout), then a linear head.

    Layers are ``net.0``, ``net.3``, ... (each block is Linear, activation, Dropout); the head is last.

    Example:
        >>> model = MLP(task="classification", in_features=4, num_outputs=3, depth=1, width=8)
        >>> [name for name, p in model.named_parameters() if p.ndim == 2]
        ['net.0.weight', 'net.3.weight']
    """

    def __init__(self, depth: int = 2, width: int = 64, dropout: float = 0.0, activation: str = "relu", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_mlp(depth, width, dropout, activation)
        layers: list[nn.Module] = []
        size = self.in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
            size = width
        self.net = nn.Sequential(*layers, nn.Linear(size, self.num_outputs))


class CNN(TaskModel):
    """Two 3x3 conv layers (``channels``, ``2 * channels``), a 2x2 max-pool and a linear head, for 8x8 digits.

    Example:
        >>> model = CNN(task="classification", in_features=64, num_outputs=10, input_shape=(1, 8, 8))
        >>> model(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: int = 8, dropout: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if len(self.input_shape) != 3:
            raise ValueError(
                f"model=cnn needs image data (data=digits, input_shape (1, 8, 8)); this data has input_shape {self.input_shape}"
            )
        c, h, w = self.input_shape
        self.net = nn.Sequential(
            nn.Unflatten(1, (c, h, w)),
            nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * channels * (h // 2) * (w // 2), self.num_outputs),
        )
