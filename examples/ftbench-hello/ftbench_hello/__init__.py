"""An ftbench plugin: the ``echo`` task, the ``threads`` backend and the ``no-decay`` optimization."""

import random

import torch

from ftbench import hookimpl, BackendSpec, NUMERICS, Optimization, StandardEngine, Task

WORDS = "red green blue cat dog sun moon tree river stone".split()


class EchoTask(Task):
    """Repeat the prompt's words in reverse order; judged by eval loss."""

    name = "echo"
    description = "reverse a short list of words"
    fields = ("words",)

    def builtin_data(self, seed, options):
        rng = random.Random(seed)
        rows = [{"words": " ".join(rng.choices(WORDS, k=4))} for _ in range(600)]
        return {"train": rows[:500], "validation": rows[500:]}

    def prompt_and_target(self, example, options):
        return example["words"], " ".join(reversed(example["words"].split()))


class ThreadsEngine(StandardEngine):
    """The standard step with a fixed number of intra-op CPU threads."""

    OPTIONS = ("threads",)

    def wrap(self, model):
        torch.set_num_threads(int(self.options["threads"]))
        return model


@hookimpl
def register_tasks(register):
    register(EchoTask())


@hookimpl
def register_backends(register):
    register(BackendSpec("threads", engine=ThreadsEngine, defaults={"threads": 1},
                         description="eager with N intra-op threads"))


class NoDecay(Optimization):
    """The recipe's AdamW without weight decay: other numerics, judged on held-out quality."""

    name = "no-decay"
    description = "AdamW without weight decay"
    changes = ("optimizer",)
    math = NUMERICS
    tolerance = 0.05
    needs = ("optimizer",)

    def build_optimizer(self, params, recipe, options, inner):
        return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                                 weight_decay=0.0)


@hookimpl
def register_optimizations(register):
    register(NoDecay())
