"""``trainer``: the Hugging Face ``Trainer``'s own training loop, as its users run it.

The recipe becomes ``TrainingArguments`` (learning rate, schedule, warmup,
weight decay, AdamW betas/eps, clipping, precision, per-device batch x
accumulation x world size = the global batch, seed, DeepSpeed config) and
the ``Trainer`` runs ``train()`` itself: its data loader, its
``training_step``, its clipping, optimizer (``TrainingArguments.optim``, the
Trainer's default unless ``optim=`` is given) and scheduler.  Evaluation,
checkpoint saving and logging are off.

The runner keeps what makes cells comparable:

* **rows and order** — the Trainer's data set is the runner's own
  micro-batches, row by row, laid out so that the Trainer's sequential
  sampler and Accelerate's per-rank batch sharding hand every rank exactly
  the rows the runner would (the record's data-order digest is taken from
  what the Trainer's collator actually received);
* **the clock** — a ``TrainerCallback`` ends each optimizer step's clock in
  ``on_step_end`` with the device synchronised (``Engine.run_loop`` and the
  runner's ``StepClock``); steps are timed end to end, so that the loop's
  own work between steps (fetching and collating the next batches, logging
  hooks) counts, as it does for a user;
* **losses** — the Trainer's per-micro-batch training losses, summed per step
  and over ranks, feed the parity check: the objective the Trainer actually
  optimised (for a model whose forward takes ``**kwargs`` but computes its own
  mean loss, such as T5 or a sequence-classification head, that is the mean
  times the world size, and ``facts()`` says so).

Where the Trainer's semantics differ from the recipe, ``facts()`` names each
difference and the record keeps the list (``as_run.differences``).
"""

from __future__ import annotations

import inspect
import os
import tempfile

from ftbench import (BackendSpec, Engine, EngineContext, FtbenchError, Unavailable, hookimpl, optimizer_name,
                     package_version, precision_policy, rows_fingerprint, version_tuple,
                     weight_decay_scope)
from ftbench import GLOBAL_MEAN

#: Releases whose Trainer counts loss tokens over accumulation and ranks (``num_items_in_batch``,
#: ``average_tokens_across_devices``) and has ``train_sampling_strategy``.
MIN_TRANSFORMERS = (4, 57)
DIST = ("ddp", "deepspeed")
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def check_stack(name: str) -> None:
    """Unavailable with an install hint unless transformers' Trainer and accelerate are installed."""
    version = package_version("transformers")
    if version is None or version_tuple(version) < MIN_TRANSFORMERS:
        floor = ".".join(map(str, MIN_TRANSFORMERS))
        raise Unavailable(f"{name} needs transformers>={floor} (installed: {version or 'none'}): "
                          f"pip install -U 'transformers>={floor}'")
    if package_version("accelerate") is None:
        raise Unavailable(f"{name} needs accelerate (the Trainer runs on it): pip install 'ftbench[stacks]' (or pip install accelerate)")


class TrainerEngine(Engine):
    """The ``Trainer``'s own loop over the runner's rows.

    Options: ``dist`` (``ddp``, the default, across ``--nproc`` ranks; or
    ``deepspeed`` with ``stage=0..3``, a config of Hugging Face ``"auto"``
    values filled by the Trainer), ``optim`` (a ``TrainingArguments.optim``
    name, e.g. ``adamw_torch``; default the Trainer's).

    Example: ``ftbench run --backend trainer --backend trainer:optim=adamw_torch --nproc 2``.
    """

    owns_loop = True
    OPTIONS = ("dist", "stage", "optim")

    @classmethod
    def check_available(cls, options: dict) -> None:
        check_stack("the trainer backend")
        if options.get("dist") == "deepspeed" and package_version("deepspeed") is None:
            raise Unavailable("trainer:dist=deepspeed needs deepspeed: pip install 'ftbench[deepspeed]'")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        super().validate_options(options)
        if options.get("dist", "ddp") not in DIST:
            raise FtbenchError(f"invalid trainer dist={options['dist']!r}; choose {' or '.join(DIST)}")
        if "stage" in options and (options.get("dist") != "deepspeed" or options["stage"] not in (0, 1, 2, 3)):
            raise FtbenchError("trainer stage=N needs dist=deepspeed and N in 0-3 (e.g. trainer:dist=deepspeed,stage=2)")
        return options

    # ------------------------------------------------------------- setup

    def setup(self, model) -> None:
        ctx: EngineContext = self.ctx
        if self.options.get("dist") == "deepspeed" and ctx.device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the first deepspeed import
        from transformers import Trainer  # the Trainer pulls in accelerate: only where a cell uses it

        self.rows = RunnerRows(ctx)
        self.losses: list = []
        self.tmp = tempfile.TemporaryDirectory(prefix="ftbench-trainer-")
        self.args = self.training_arguments(self.tmp.name)
        self.trainer = Trainer(model=model, args=self.args, train_dataset=self.rows,
                               data_collator=self.rows.collate, callbacks=[])
        self.trainer.training_step = _LossTap(self.trainer.training_step, self.losses)
        self.optimizer = None

    def training_arguments(self, output_dir: str):
        """The recipe as ``TrainingArguments`` (the Trainer's own defaults for everything else)."""
        from transformers import TrainingArguments  # see setup()

        ctx: EngineContext = self.ctx
        r = ctx.recipe
        micro = r.batch_size // (ctx.world_size * r.grad_accum)
        kwargs = dict(
            output_dir=output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=r.grad_accum,
            max_steps=r.steps, learning_rate=r.lr, weight_decay=r.weight_decay, adam_beta1=r.betas[0],
            adam_beta2=r.betas[1], adam_epsilon=r.eps, max_grad_norm=float(r.max_grad_norm or 0.0),
            lr_scheduler_type=SCHEDULES[r.schedule], warmup_steps=r.lr_warmup_steps,
            bf16=r.precision == "bf16", fp16=r.precision == "fp16", use_cpu=ctx.device.type != "cuda",
            seed=r.seed, data_seed=r.seed, train_sampling_strategy="sequential",
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=ctx.device.type == "cuda",
            remove_unused_columns=False, ddp_find_unused_parameters=False,
        )
        if self.options.get("optim"):
            kwargs["optim"] = self.options["optim"]
        if self.options.get("dist") == "deepspeed":
            kwargs["deepspeed"] = hf_deepspeed_config(int(self.options.get("stage", 2)))
        return TrainingArguments(**kwargs)

    # -------------------------------------------------------------- loop

    def run_loop(self, steps, clock) -> None:
        from transformers import TrainerCallback  # see setup()

        self.rows.attach(steps)
        losses, world = self.losses, self.ctx.world_size
        engine = self

        class RunnerClockCallback(TrainerCallback):
            """Hands each optimizer step's end to the runner's clock (which synchronises the device)."""

            lr = None

            def on_train_begin(self, args, state, control, **kw):
                clock.begin()

            def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
                self.lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None

            def on_step_end(self, args, state, control, optimizer=None, **kw):
                engine.optimizer = optimizer
                loss = sum(losses) / world  # this rank's share of the global mean (see _LossTap)
                losses.clear()
                if clock.end(loss, self.lr):
                    control.should_training_stop = True

        self.trainer.add_callback(RunnerClockCallback())
        self.trainer.train()

    # --------------------------------------------- profile / evaluation

    def forward_backward(self, batch: dict, boundary: bool):
        """One micro-batch through the Trainer's own ``training_step`` (``--profile``'s extra steps)."""
        inputs = {k: v for k, v in batch.items() if k != "loss_scale"}
        return self.trainer.training_step(self.trainer.model_wrapped, inputs)

    def step(self) -> None:
        t = self.trainer
        if self.args.max_grad_norm > 0:
            t._clip_grad_norm(t.model_wrapped)
        t.optimizer.step()
        t.lr_scheduler.step()
        t.model_wrapped.zero_grad()
        self.losses.clear()

    def eval_model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)

    def facts(self) -> dict:
        t, r = self.trainer, self.ctx.recipe
        counts_tokens = bool(t.model_accepts_loss_kwargs) and self.args.average_tokens_across_devices
        ignores_count = counts_tokens and not model_uses_item_count(type(self.eval_model()))
        scaled = self.ctx.world_size * r.grad_accum > 1
        differences = [
            "collation: the Trainer's data loader stacks each step's rows and moves them to the device inside "
            "the timed step (the runner collates before its clock)",
            "timing: steps timed end to end (the Trainer's fetching, callbacks and bookkeeping between "
            "optimizer steps count)",
        ]
        if ignores_count and scaled:
            differences.append(
                "loss: the Trainer takes this model for one that normalises by num_items_in_batch (its forward "
                "takes **kwargs) but the model returns its own mean; so each micro-batch's mean is multiplied by "
                "the world size and not divided by the accumulation steps: the objective and its gradients are "
                f"{self.ctx.world_size * r.grad_accum}x the recipe's (clipping and AdamW's eps see that scale)")
        if not counts_tokens:
            differences.append("loss: mean per micro-batch divided by the accumulation steps, averaged over ranks "
                               "(the recipe: summed over the global step, divided by its loss units); equal "
                               "only when every micro-batch holds the same number of loss units")
        if r.weight_decay:
            differences.append("weight decay: the Trainer exempts biases and norm weights (the recipe's AdamW "
                               "decays every weight)")
        if r.lr_warmup_steps:
            differences.append(f"scheduler: transformers' {self.args.lr_scheduler_type} schedule warms up from "
                               f"lr 0 at step 0 (the recipe's warmup starts at lr/{r.lr_warmup_steps})")
        optimizer = getattr(t.optimizer, "optimizer", t.optimizer)
        if ignores_count and scaled:
            normalisation = "mean per micro-batch x world size, summed over micro-batches and ranks"
        elif counts_tokens:
            normalisation = GLOBAL_MEAN
        else:
            normalisation = "mean per micro-batch / accumulation steps, mean over ranks"
        return {
            "loss_normalisation": normalisation,
            "precision_policy": precision_policy(r),
            "optimizer": f"{optimizer_name(optimizer)} [optim={getattr(self.args.optim, 'value', self.args.optim)}]",
            "data_order_rows": self.rows.step_fingerprints(),
            "weight_decay": weight_decay_scope(t.optimizer),
            "differences": differences,
        }

    def stats(self) -> dict:
        return {"training_arguments": {k: str(v) for k, v in sorted(self.args.to_dict().items())
                                       if k in ("optim", "lr_scheduler_type", "warmup_steps", "per_device_train_batch_size",
                                                "gradient_accumulation_steps", "max_steps", "bf16", "fp16",
                                                "average_tokens_across_devices", "deepspeed")}}


def model_uses_item_count(model_class) -> bool:
    """Whether the model's forward hands ``num_items_in_batch`` to a transformers loss function
    (``self.loss_function``) rather than computing its own mean loss."""
    try:
        source = inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return True  # no source to read: take the Trainer's own assumption
    return "loss_function" in source


class _LossTap:
    """Keeps each micro-batch's loss as the Trainer's ``training_step`` returns it (detached,
    already scaled: the micro-batches of a step sum to the rank's share times the world size
    when the Trainer counts loss tokens across devices, or to the rank's mean otherwise)."""

    def __init__(self, training_step, sink: list):
        self.training_step, self.sink = training_step, sink

    def __call__(self, *args, **kwargs):
        loss = self.training_step(*args, **kwargs)
        self.sink.append(loss)
        return loss


class RunnerRows:
    """The runner's micro-batches as a row data set in the order the Trainer reads it.

    With a sequential sampler, per-device batch ``m`` and Accelerate's batch sharding (global batch
    ``b`` goes to rank ``b % world``), row ``i`` belongs to rank ``(i // m) % world``; on this rank
    it is row ``i % m`` of local micro-batch ``(i // m) // world``.  Only this rank's rows are ever
    read, in order, so the runner's steps are pulled (and collated) as the Trainer reaches them.
    """

    def __init__(self, ctx: EngineContext):
        r = ctx.recipe
        self.world, self.accum = ctx.world_size, r.grad_accum
        self.micro = r.batch_size // (ctx.world_size * r.grad_accum)
        self.n = r.steps * r.batch_size
        self.steps = None
        self.cache: dict[int, list[dict]] = {}
        self.fingerprints: list[int] = []

    def attach(self, steps) -> None:
        self.steps = iter(steps)
        self.pulled = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        local = (i // self.micro) // self.world
        step, j = divmod(local, self.accum)
        while self.pulled <= step:
            micro, _ = next(self.steps)
            self.cache[self.pulled] = micro
            self.cache.pop(self.pulled - 2, None)  # the Data loader reads at most one step ahead
            self.pulled += 1
        batch = self.cache[step][j]
        row = i % self.micro
        return {k: v[row] for k, v in batch.items() if k != "loss_scale"}

    def collate(self, rows: list[dict]) -> dict:
        from transformers import default_data_collator  # see TrainerEngine.setup()

        batch = default_data_collator(rows)
        self.fingerprints.append(rows_fingerprint(batch))
        return batch

    def step_fingerprints(self) -> list[int]:
        """Each optimizer step's row fingerprint on this rank, from the batches the Trainer collated
        (the data loader may have collated one step ahead: only whole steps count)."""
        f, a = self.fingerprints, self.accum
        return [sum(f[i:i + a]) % 2**64 for i in range(0, len(f) - len(f) % a, a)]


def hf_deepspeed_config(stage: int) -> dict:
    """A DeepSpeed config as Hugging Face's examples write it: ``"auto"`` wherever the Trainer
    fills a value from its arguments and the model (integrations/deepspeed.py)."""
    zero = {"stage": stage}
    if stage >= 2:
        zero.update(reduce_bucket_size="auto", overlap_comm=True, contiguous_gradients=True)
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero}


@hookimpl
def register_backends(register):
    register(BackendSpec("trainer", engine=TrainerEngine, defaults={"dist": "ddp"}, data_parallel=True,
                         description="the Hugging Face Trainer's own training loop (TrainingArguments from the "
                                     "recipe; DDP across --nproc ranks, or dist=deepspeed)"))
