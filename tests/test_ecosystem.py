"""The integrations users already use, offline: timm's optimizer factory and Hugging Face's Trainer.

Each is an optional dependency of the tests (skipped with a reason when missing; CI installs both, see
scripts/setup.sh). Lightning needs no glue (``configure_optimizers`` returns our optimizer; README) and is not
installed here, so it is documented, not tested.
"""

import pytest
import torch

from cases import backend_or_skip
from tvlars_fused import LAMB, LARS, TVLARS
from tvlars_fused.integrations import TIMM_NAMES, register_with_timm


def _timm():
    return pytest.importorskip("timm.optim", reason="timm is not installed (pip install timm)")


class _Net(torch.nn.Module):
    """Linear layers (decayed, 2-D), their biases and a LayerNorm (timm's no-decay group)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(),
                                        torch.nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def _train(model, opt, steps=5):
    for step in range(steps):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name,cls,kwargs", [
    ("tvlars", TVLARS, dict(lr=0.5, lmbda=0.01)),
    ("tvfusedlars", LARS, dict(lr=0.5, nesterov=True)),
    ("tvfusedlamb", LAMB, dict(lr=1e-2, betas=(0.9, 0.99), max_grad_norm=1.0)),
])
@pytest.mark.parametrize("backend", ["reference", "foreach", "cpp"])
def test_timm_factory_builds_ours_with_its_no_decay_groups(name, cls, kwargs, backend):
    """create_optimizer_v2 gives our class, with timm's two groups (weight_decay 0 for the biases and the
    LayerNorm, the decay for the 2-D weights) and timm's momentum default, and it steps exactly as our class
    built by hand from the same groups."""
    timm_optim = _timm()
    backend_or_skip(backend)
    assert register_with_timm() == list(TIMM_NAMES)
    model, twin = _Net(), _Net()
    opt = timm_optim.create_optimizer_v2(model, opt=name, weight_decay=1e-2, backend=backend, **kwargs)
    assert type(opt) is cls
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_decay == {0.0: {id(p) for p in model.parameters() if p.ndim <= 1},
                        1e-2: {id(p) for p in model.parameters() if p.ndim > 1}}
    if cls is not LAMB:
        assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    groups = timm_optim.param_groups_weight_decay(twin, weight_decay=1e-2)
    by_hand = cls(groups, backend=backend, **({"momentum": 0.9} if cls is not LAMB else {}), **kwargs)
    for ours, theirs in zip(_train(model, opt), _train(twin, by_hand)):
        assert torch.equal(ours, theirs)


def test_timm_no_decay_group_is_ours_without_weight_decay():
    """The LAMB timm builds (a no-decay group, adapted) is our one-group LAMB whose 1-D parameters are excluded
    from weight decay only: timm's grouping reaches the step as the exclusion it stands for."""
    timm_optim = _timm()
    register_with_timm()
    model, twin = _Net(), _Net()
    opt = timm_optim.create_optimizer_v2(model, opt="tvfusedlamb", lr=1e-2, weight_decay=0.1, backend="reference")
    one_group = LAMB(twin.parameters(), lr=1e-2, weight_decay=0.1, backend="reference",
                     exclude_from_weight_decay=lambda p: p.ndim <= 1)
    decayed_everywhere = LAMB(_Net().parameters(), lr=1e-2, weight_decay=0.1, backend="reference")
    ours, theirs = _train(model, opt), _train(twin, one_group)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(ours, _train(_Net(), decayed_everywhere)))


@pytest.mark.parametrize("timm_name,ours", [
    ("lars", lambda groups: LARS.timm(groups, 0.5, momentum=0.9)),
    ("nlarc", lambda groups: LARS.timm(groups, 0.5, momentum=0.9, nesterov=True, trust_clip=True)),
    ("lamb", lambda groups: LAMB.timm(groups, 0.5)),
    ("lambcw", lambda groups: LAMB.timm(groups, 0.5, trust_clip=True, decoupled_decay=True)),
])
def test_timm_factory_names_and_the_migration_table(timm_name, ours):
    """docs/migration.md's rows for timm's factory names: timm's own optimizer from create_optimizer_v2 and ours
    built as the table says, on the factory's groups, take the same steps (to rounding: timm orders its arithmetic
    differently)."""
    timm_optim = _timm()
    model, twin = _Net(), _Net()
    theirs = timm_optim.create_optimizer_v2(model, opt=timm_name, lr=0.5, weight_decay=1e-2)
    assert type(theirs).__module__.startswith("timm.")
    mine = ours(timm_optim.param_groups_weight_decay(twin, weight_decay=1e-2))
    for a, b in zip(_train(model, theirs), _train(twin, mine)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_register_with_timm_is_idempotent_and_never_overwrites_timm():
    timm_optim = _timm()
    from timm.optim import OptimizerRegistry

    registry = OptimizerRegistry()
    registry.register(timm_optim.OptimInfo(name="tvfusedlamb", opt_class=timm_optim.Lamb, has_betas=True))
    with pytest.raises(ValueError, match="'tvfusedlamb'.*not overwriting"):
        register_with_timm(registry)
    assert registry.get_optimizer_info("tvfusedlamb").opt_class is timm_optim.Lamb
    fresh = OptimizerRegistry()
    assert register_with_timm(fresh) == register_with_timm(fresh) == list(TIMM_NAMES)
    assert {fresh.get_optimizer_info(n).opt_class for n in TIMM_NAMES} == {TVLARS, LARS, LAMB}
    from timm.optim._optim_factory import default_registry

    for timm_name in ("lars", "lamb", "fusedlamb"):  # timm's own names still mean timm's optimizers
        assert default_registry.get_optimizer_info(timm_name).opt_class not in (TVLARS, LARS, LAMB)


# ----------------------------------------------------------------- Hugging Face Transformers

def _transformers():
    pytest.importorskip("accelerate", reason="accelerate (the Trainer needs it) is not installed (pip install "
                                             "transformers accelerate)")
    return pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers "
                                                      "accelerate)")


class _Pairs(torch.utils.data.Dataset):
    """A synthetic two-class task: label 1 when token 5 occurs in the sequence."""

    def __init__(self, n=32, length=12, vocab=40):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(6, vocab, (n, length), generator=gen)
        self.ids[::2, 3] = 5
        self.labels = (self.ids == 5).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _trainer(tmp_path, max_steps, stop_at=None):
    """A Trainer for ``max_steps`` steps (the schedule's length), stopped after ``stop_at`` when given (a run
    interrupted there: the same schedule, cut short)."""
    transformers = _transformers()

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.set_seed(0)
    model = transformers.BertForSequenceClassification(config)
    training_args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8, weight_decay=0.01,
        lr_scheduler_type="linear", warmup_steps=2, use_cpu=True, report_to=[], logging_strategy="no",
        save_strategy="steps", save_steps=4, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    return transformers.Trainer(model=model, args=training_args, train_dataset=_Pairs(),
                                optimizer_cls_and_kwargs=(LAMB, dict(lr=5e-3, max_grad_norm=1.0)),
                                callbacks=[StopAt()] if stop_at is not None else None)


def _unwrapped(trainer):
    """The Trainer's optimizer without accelerate's wrapper."""
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def test_transformers_trainer_trains_with_lamb_and_resumes_from_its_checkpoint(tmp_path):
    """A tiny BERT from a config (no download) trains 8 steps with our LAMB under the Trainer's linear schedule
    (warm-up, then decay: the lr reaches the optimizer's groups); a run stopped at its step-4 checkpoint and
    resumed from it ends with the parameters and optimizer state of the uninterrupted run, bit for bit: the
    checkpoint carried LAMB's moments and per-layer step counts, and the Trainer its schedule."""
    whole = _trainer(tmp_path / "whole", 8)
    whole.train()
    opt = _unwrapped(whole)
    assert type(opt) is LAMB
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]  # the Trainer's no-decay group
    assert all(s["step"].item() == 8 for s in opt.state.values())
    assert all(g["lr"] == 0.0 for g in opt.param_groups)  # the schedule drove the groups: linear decay to 0

    first = _trainer(tmp_path / "resumed", 8, stop_at=4)
    first.train()
    assert {s["step"].item() for s in _unwrapped(first).state.values()} == {4.0}
    checkpoint = tmp_path / "resumed" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = _trainer(tmp_path / "resumed", 8)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_opt = _unwrapped(resumed)
    for (name, p), q in zip(whole.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p.detach(), q.detach()), name
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed_opt.state[q][key]), f"{name} {key}"
