"""From a metrics.jsonl record to tracker tags: the one place that names what a user finds in
TensorBoard and MLflow (the table in docs/writers.md).

A record is one line of metrics.jsonl: `{"type": ..., "iter": N, key: value, ...}`. Its step is
`iter`. Every number becomes a scalar under a stable tag; every other value (alarm text, notes,
lists) goes into one text block per record. Tags:
  train lines:  loss/total, loss/<term> (unweighted), loss_weighted/<term>, lr, grad_norm, time/iter,
                time/data, and the model's stats under their own names (avg_factor/..., rpn/...);
  other types:  <type>/<key> with the same renaming (eval/AP, eval/AP_class/<class>, eval/val/loss,
                monitor/dets_per_img/0.5, summary/AP ...); an alarm is also alarm/<name> = 1.
Every tag segment is cleaned (letters, digits, '-', '_', '.'): class names come from the dataset,
and MLflow's file store makes each metric name a path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rcnn_trainer.run_folder import safe_name

RENAMED = {"loss": "loss/total", "time": "time/iter", "data_time": "time/data", "gt_per_image": "gt_per_img"}
ALARM_TYPES = ("alarm", "preflight")
PER_CLASS = ("AP", "segm_AP")  # eval keys that are also the folder of per-class keys (AP and AP/<class>)


@dataclass
class Parts:
    """What one record gives the writers: its step, its scalars by tag, its texts by tag."""
    step: int
    scalars: dict[str, float] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def clean_tag(tag: str) -> str:
    """Each '/'-separated segment reduced to safe file-name characters (never '.' or '..')."""
    return "/".join(safe_name(segment, limit=120) for segment in tag.split("/"))


def key_tag(key: str) -> str:
    """A record key as a tag: loss_roi_cls -> loss/roi_cls, loss_roi_cls_weighted -> loss_weighted/roi_cls,
    dets@0.5 -> dets_per_img/0.5, AP/<class> -> AP_class/<class>; other keys that hold a '/' already
    (avg_factor/..., val/loss) stay. MLflow's file store makes a tag a file, so none is a prefix of another."""
    if key in RENAMED:
        return RENAMED[key]
    if key.startswith("loss_") and key.endswith("_weighted"):
        return "loss_weighted/" + key[len("loss_"):-len("_weighted")]
    if key.startswith("loss_"):
        return "loss/" + key[len("loss_"):]
    if key.startswith("dets@"):
        return "dets_per_img/" + key[len("dets@"):]
    for per_class in PER_CLASS:  # AP/<class> -> AP_class/<class>: no tag may be a folder of others
        if key.startswith(per_class + "/"):
            return f"{per_class}_class/" + key[len(per_class) + 1:]
    return key


def number(value) -> float | None:
    """The float of a metrics value (bools count 0/1), None for text; "nan"/"inf" as metrics.jsonl spells them."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def alarm_text(record: dict) -> str:
    """The alarm as the console prints it (monitor/alarms.py Alarm.format)."""
    lines = [f"ALARM [{record.get('name', '?')}]" + (f" ({record['severity']})" if "severity" in record else ""),
             f"  seen:   {record.get('seen', '')}", f"  why:    {record.get('why', '')}"]
    lines += [f"  change: {item}" for item in record.get("change", [])]
    return "\n".join(lines)


def split_record(record: dict) -> Parts:
    """The step, scalars and texts of one metrics.jsonl record (see the module docstring)."""
    kind = str(record.get("type", "train"))
    parts = Parts(step=int(record.get("iter", 0)))
    prefix = "" if kind == "train" else f"{kind}/"
    other = {}
    for key, value in record.items():
        if key in ("type", "iter"):
            continue
        as_number = number(value)
        if as_number is None:
            other[key] = value
        else:
            parts.scalars[clean_tag(prefix + key_tag(key))] = as_number
    if kind in ALARM_TYPES:
        name = clean_tag(str(record.get("name", "unnamed")))
        parts.scalars[f"{kind}/{name}"] = 1.0  # the marker: a spike at the alarm's iteration
        parts.texts[f"{kind}s/{name}"] = alarm_text(record)
    elif other:
        parts.texts[clean_tag(kind)] = "\n".join(f"{key}: {value}" for key, value in other.items())
    return parts
