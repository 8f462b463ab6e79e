"""Remedies: loss-weight ramps, LR range test, OHEM, Wise-IoU v3, recipe configs, alarm keys."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config, tiny_dict, write_yaml
from rcnn_trainer.cli import train_main
from rcnn_trainer.config import WeightRamp
from rcnn_trainer.config_loader import _check_key_path, config_to_dict, deep_merge, load_config
from rcnn_trainer.data.loader import build_dataset, build_train_loader
from rcnn_trainer.runtime.checkpoint import load_checkpoint
from rcnn_trainer.data.settings import resolve_from_checkpoint
from rcnn_trainer.train.lr_finder import lr_sweep, suggest_lr
from rcnn_trainer.train.metrics_log import MetricsLog
from rcnn_trainer.train.optim import build_optimizer
from rcnn_trainer.train.trainer import train
from rcnn_trainer.errors import UserError
from rcnn_trainer.losses.weighting import ramped_weight
from rcnn_trainer.losses.wise_iou import WiseIoULoss
from rcnn_trainer.model.build import build_loss_weights, build_model
from rcnn_trainer.model.roi_heads import select_hardest
from rcnn_trainer.monitor import checks
from rcnn_trainer.monitor.checks import check_collapse
from rcnn_trainer.monitor.period import PeriodMeans
from rcnn_trainer.monitor.probe import ClassDiagnosis, ProbeResult
from rcnn_trainer.monitor.threshold_counts import ThresholdCounts

REPO = Path(__file__).resolve().parents[1]
quiet = lambda _m: None


# ------------------------------------------------------------------ weight ramps
def test_ramp_hand_computed():
    linear = WeightRamp(start=1.0, iters=10, shape="linear")
    assert [ramped_weight(2.0, linear, i) for i in (0, 5, 10, 50)] == [1.0, 1.5, 2.0, 2.0]
    cosine = WeightRamp(start=1.0, iters=8, shape="cosine")
    assert ramped_weight(2.0, cosine, 2) == pytest.approx(1.0 + 0.5 * (1 - math.cos(math.pi / 4)))
    assert ramped_weight(2.0, None, 0) == 2.0


def test_ramped_weight_is_logged_each_iteration(tmp_path):
    cfg = tiny_config(tmp_path, model={"roi": {"box_loss": {"weight": 2.0, "weight_ramp": {"start": 1.0, "iters": 4}}}})
    assert build_loss_weights(cfg.model).at(2)["loss_roi_box"] == 1.5
    train(cfg, log=quiet, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert [l["weight/loss_roi_box"] for l in lines] == [1.0, 1.25, 1.5, 1.75]
    assert all(l["loss_roi_box_weighted"] == pytest.approx(l["loss_roi_box"] * l["weight/loss_roi_box"], rel=1e-5)
               for l in lines)


# ------------------------------------------------------------------ LR range test
def test_lr_sweep_suggests_and_leaves_model_unchanged(tmp_path):
    cfg = tiny_config(tmp_path)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.solver)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = iter(build_train_loader(cfg, build_dataset(cfg, "train")))
    points = lr_sweep(model, optimizer, batches, build_loss_weights(cfg.model).final(), min_lr=1e-5, max_lr=10.0, iters=25,
                      device=torch.device("cpu"), progress=False)
    suggestion = suggest_lr(points)
    assert suggestion is not None and math.isfinite(suggestion) and 1e-6 < suggestion < 10.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # momentum buffers restored (empty, as before)


def test_lr_find_cli_writes_no_checkpoint(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", tiny_dict(tmp_path))
    code = train_main(["--config", str(config), "--lr-find", "--lr-find-iters", "12", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "suggested solver.lr=" in out and "rule:" in out
    assert (tmp_path / "run" / "lr_find.json").is_file() and (tmp_path / "run" / "lr_find.png").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lr_sweep_stops_early_on_divergence(tmp_path):
    cfg = tiny_config(tmp_path, solver={"optimizer": "sgd"})
    model = build_model(cfg.model)
    batches = iter(build_train_loader(cfg, build_dataset(cfg, "train")))
    points = lr_sweep(model, build_optimizer(model, cfg.solver), batches, build_loss_weights(cfg.model).final(),
                      min_lr=1e-3, max_lr=1e6, iters=30, device=torch.device("cpu"), progress=False)
    assert 0 < len(points) < 30


# ------------------------------------------------------------------ OHEM
def test_ohem_picks_the_highest_loss_rois():
    losses = torch.tensor([0.1, 5.0, 0.3, 2.0, 9.0, 0.2, 50.0])
    labels = torch.tensor([1, 2, 0, 0, 0, 0, -1])  # the -1 RoI (highest loss) is ignored
    assert select_hardest(losses, labels, num=4, positive_fraction=0.5).tolist() == [1, 0, 4, 3]
    assert select_hardest(losses, labels, num=4, positive_fraction=0.25).tolist() == [1, 4, 3, 2]


def test_ohem_trains(tmp_path):
    cfg = tiny_config(tmp_path, model={"roi": {"sampler": "ohem"}}, solver={"max_iters": 2})
    train(cfg, log=quiet, progress=False)
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert all(l["avg_factor/roi_cls"] == pytest.approx(l["roi/pos_per_image"] * 2 + l["roi/neg_per_image"] * 2)
               for l in lines)  # same avg_factor rule: the sampled RoIs


# ------------------------------------------------------------------ Wise-IoU v3
def test_wiou_hand_computed():
    pred, gt = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    loss_iou = 1 - 1 / 7
    r_wiou = math.exp(2 / 18)
    beta = loss_iou / 1.0
    focus = beta / (3.0 * 1.9 ** (beta - 3.0))
    module = WiseIoULoss(alpha=1.9, delta=3.0, momentum=0.1).eval()
    assert module(pred, gt).item() == pytest.approx(focus * r_wiou * loss_iou, rel=1e-5)
    module.train()
    trained = module(pred, gt).item()
    mean = 0.9 * 1.0 + 0.1 * loss_iou
    assert module.iou_loss_mean.item() == pytest.approx(mean)
    beta = loss_iou / mean
    assert trained == pytest.approx(beta / (3.0 * 1.9 ** (beta - 3.0)) * r_wiou * loss_iou, rel=1e-5)
    assert module(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def test_wiou_state_survives_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, model={"roi": {"box_loss": {"type": "wiou"}}, "rpn": {"box_loss": {"type": "wiou"}}},
                      solver={"max_iters": 3})
    train(cfg, log=quiet, progress=False)
    state = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)["model"]
    assert state["rpn.box_wiou.iou_loss_mean"].item() != 1.0
    fresh = build_model(cfg.model)
    fresh.load_state_dict(state)
    assert fresh.rpn.box_wiou.iou_loss_mean.item() == state["rpn.box_wiou.iou_loss_mean"].item()


# ------------------------------------------------------------------ recipes
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def recipe_settings(recipe: Path) -> dict:
    """The recipe file's own settings, as dotted key -> value (not its _base_'s)."""
    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    raw = yaml.safe_load(recipe.read_text())
    return dict(leaves({k: v for k, v in raw.items() if k not in ("_base_", "output_dir")}))


def value_at(cfg, key: str):
    tree = config_to_dict(cfg)
    for part in key.split("."):
        tree = tree[part]
    return tree


def on_synthetic_data(tmp_path: Path, base: Path | None, **updates) -> dict:
    """`base` (a recipe) with the test's synthetic data in place of its own files."""
    data = {"train": None, "val": None, "synthetic": tiny_dict(tmp_path)["data"]["synthetic"]}
    child = {"output_dir": str(tmp_path / "run"), "data": data}
    if base is not None:
        child["_base_"] = str(base)
    return deep_merge(child, updates)


def _replaced(key: str, child: dict) -> bool:
    tree = child
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
        if not isinstance(tree, dict):
            return True
    return True


# a recipe setting -> what the built model or the run's log shows of it
EFFECTS = {
    "model.rpn.cls_pos_weight": lambda model, lines: model.rpn.losses.cls.pos_weight,
    "model.roi.cls_pos_weight": lambda model, lines: model.roi_heads.losses.cls.pos_weight,
    "model.roi.box_loss.type": lambda model, lines: model.roi_heads.losses.box.type,
    "model.roi.box_loss.weight": lambda model, lines: lines[-1]["weight/loss_roi_box"],
    "model.rpn.fg_iou_thresh": lambda model, lines: model.rpn.proposal_matcher.high_threshold,
    "model.anchors.sizes": lambda model, lines: [list(s) for s in model.rpn.anchor_generator.sizes],
    "model.mask.enabled": lambda model, lines: model.roi_heads.has_mask(),
    "model.mask.num_convs": lambda model, lines: sum(isinstance(m, torch.nn.Conv2d) for m in model.roi_heads.mask_head.modules()),
    "solver.clip_grad_norm": lambda model, lines: 10.0 if all(l["clipped"] == (l["grad_norm"] > 10.0) for l in lines) else None,
}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_settings_are_what_the_config_resolves_to(tmp_path, recipe):
    """Every setting a recipe writes is in the config it resolves to (its _base_ does not undo
    it), and the recipe changes something against that base (cpu_demo, the reference, nothing)."""
    settings = {k: v for k, v in recipe_settings(recipe).items() if not k.startswith(("data.train", "data.val", "data.synthetic"))}
    cfg = load_config(write_yaml(tmp_path / "r.yaml", on_synthetic_data(tmp_path, recipe)))
    for key, value in settings.items():
        assert value_at(cfg, key) == value, (recipe.name, key)
    base_name = yaml.safe_load(recipe.read_text()).get("_base_")
    if base_name is None:  # a root recipe: against the schema's defaults
        base_raw = on_synthetic_data(tmp_path, None, model={"num_classes": value_at(cfg, "model.num_classes")})
    else:
        base_raw = on_synthetic_data(tmp_path, (recipe.parent / base_name).resolve())
    base = load_config(write_yaml(tmp_path / "b.yaml", base_raw))
    changed = {k for k, v in settings.items() if value_at(base, k) != v}
    if recipe.stem == "cpu_demo":
        assert not settings and config_to_dict(cfg) == config_to_dict(base)
    else:
        assert changed, recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_and_runs(tmp_path, recipe):
    # only the data, weights and sizes change: the recipe's own settings (losses, weights, solver) stay
    child_raw = {
        "_base_": str(recipe), "output_dir": str(tmp_path / "run"),
        "data": {"train": None, "val": None, "synthetic": tiny_dict(tmp_path)["data"]["synthetic"],
                 "batch_size": 2, "num_workers": 0, "min_size": 64, "max_size": 64},
        "model": {"num_classes": 4, "backbone": {"weights": None, "norm": "gn", "fpn_channels": 16},
                  "rpn": {"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50,
                          "pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
                  "roi": {"representation_size": 32, "batch_size_per_image": 32}},
        "solver": {"max_iters": 2, "warmup_iters": 1, "steps": []}, "train": {"threads": 2, "eval_period": 0}}
    child = write_yaml(tmp_path / "child.yaml", child_raw)
    cfg = load_config(child)
    train(cfg, log=quiet, progress=False)
    kept = {k: v for k, v in recipe_settings(recipe).items() if not _replaced(k, child_raw)}
    ckpt = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert ckpt["iteration"] == 2
    for key, value in kept.items():  # the run trained with the recipe's settings
        tree = ckpt["config"]
        for part in key.split("."):
            tree = tree[part]
        assert tree == value, (recipe.name, key)
    model = build_model(resolve_from_checkpoint(cfg, ckpt["config"]).model)
    assert set(ckpt["model"]) == set(model.state_dict())  # the model the run trained is this one
    lines = [l for l in MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if l["type"] == "train"]
    assert lines and lines[-1]["iter"] == 2
    for key in kept.keys() & EFFECTS.keys():
        assert EFFECTS[key](model, lines) == kept[key], (recipe.name, key)


def test_recipes_say_when_to_use_them():
    """Each recipe's header says when to use it and names real alarms (or says none points to
    it); every alarm README's "When training goes wrong" table sends to a recipe is named there."""
    import re

    known = {a.name for a in every_alarm()} | set(re.findall(r'name="([a-z_]+)"', inspect.getsource(
        __import__("rcnn_trainer.monitor.preflight", fromlist=["x"]))))
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| ") and "configs/" in line]
    for recipe in RECIPES:
        header = " ".join(l.lstrip("# ") for l in recipe.read_text().splitlines() if l.startswith("#"))
        assert re.search(r"\bUse (when|it)\b", header), recipe.name
        named = {n for n in known if re.search(rf"\b{n}\b", header)}
        assert named or "no alarm points here" in header.lower(), (recipe.name, header[:200])
        sent_here = [set(re.findall(r"`([a-z_]+)`", row.split("|")[1])) & known
                     for row in rows if f"configs/{recipe.name}" in row]
        for alarms in sent_here:
            assert alarms <= named, (recipe.name, alarms - named)


# ------------------------------------------------------------------ every alarm names real keys
def every_alarm():
    """Provoke every alarm the monitor and the preflight can raise."""
    p = {"loss": 1.0, "gt_per_image": 3.0, "lr": 1e-9, "roi/pos_proposal_iou": 0.5,
         "rpn/pos_per_image": 0.0, "rpn/neg_per_image": 256.0, "roi/pos_per_image": 0.0, "roi/neg_per_image": 512.0,
         "rpn/box_loss_per_pos": 0.99, "roi/box_loss_per_pos": 0.99, "rpn/pred_iou": 0.01, "roi/pred_iou": 0.01,
         "roi/delta_std_ratio": 0.0, "roi/delta_corr": 0.0}
    p.update({n: 0.25 for n in checks.WEIGHT_KEYS}, **{f"{n}_weighted": 0.05 for n in checks.WEIGHT_KEYS})
    p["loss_roi_box_weighted"] = 0.85
    falling = [PeriodMeans.from_means(dict(p, loss=1 - 0.1 * i, loss_roi_cls_weighted=0.3 - 0.05 * i))
               for i in range(6)]
    masked = PeriodMeans.from_means(dict(p, **{"roi/mask_iou": 0.4, "roi/mask_trivial_iou": 0.7}))
    p = PeriodMeans.from_means(p)
    alarms = [
        checks.check_mask_not_learning([masked] * 3, sustain=3),
        checks.check_initial_loss_scale({"loss_rpn_cls": 100.0, "loss_roi_cls": 100.0, "loss_rpn_box": 9.0,
                                         "loss_roi_box": 9.0}, {"loss_rpn_cls": 0.69, "loss_roi_cls": 1.6}),
        checks.check_weight_ratio({"loss_rpn_cls": 1, "loss_rpn_box": 1, "loss_roi_cls": 0.5, "loss_roi_box": 7.5}),
        checks.check_dominant_term([p] * 3, max_share=0.7, sustain=3),
        checks.check_flat_term(falling, window=5),
        checks.check_stuck_iou_loss([p] * 3, {"rpn": "giou", "roi": "ciou"}, sustain=3),
        checks.check_foreground_starvation([p] * 3, sustain=3),
        checks.check_proposal_iou_not_rising([p] * 6),
        checks.check_regressor_collapse([p] * 3, sustain=3),
        checks.check_learning_rate(1e-9, 1e-2, 1.0, 1.0, progress=0.5, past_warmup=True),
        checks.check_lr_per_image(1.0, 2, "sgd"),
        checks.check_gradients([100.0], [1.0] * 20, 0.9, 1),
        checks.check_loss_scale([8.0, 4.0, 2.0, 1.0]),
        check_collapse([0.0, 0.0, 0.0], 3.0, min_ratio=0.1, patience=3),
        checks.check_low_confidence([probe_result(fg_mass=0.1, correct=nan, accuracy=nan, margin=nan)] * 3,
                                    sustain=3),
        checks.check_low_confidence([probe_result(fg_mass=0.9, correct=0.3, accuracy=0.3, margin=0.05)] * 3,
                                    sustain=3),
    ]
    assert all(a is not None for a in alarms)
    return alarms


nan = math.nan


def probe_result(**classes) -> ProbeResult:
    """5 detections/image at score >= 0.05, none at 0.5, 3 GT objects/image."""
    return ProbeResult(ThresholdCounts((0.05, 0.5), (5.0, 0.0), 3.0), ClassDiagnosis(spread=nan, **classes))


def preflight_alarm_changes() -> list[str]:
    """The 'change' lists written in preflight.py, read from its source."""
    import rcnn_trainer.monitor.preflight as preflight

    source = inspect.getsource(preflight)
    return [s for s in __import__("re").findall(r'"((?:model|data|solver|monitor|train)\.[a-z_.]+)', source)]


def keys_in(change: str) -> list[str]:
    head = change.split(":")[0]
    return [k.strip() for k in head.split("/") if k.strip().split(".")[0] in ("model", "data", "solver", "monitor", "train")]


def test_every_alarm_names_valid_config_keys():
    named = []
    for alarm in every_alarm():
        assert alarm.change, alarm.name
        for change in alarm.change:
            named += keys_in(change)
    named += preflight_alarm_changes()
    assert len(named) > 25
    for key in named:
        try:
            _check_key_path(key.split("."), key)
        except UserError as err:
            pytest.fail(f"an alarm names '{key}', which is not a config key: {err}")
