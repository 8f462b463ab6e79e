"""The `solver:` and `train:` sections of config.yaml: optimizer, lr schedule, AMP and the
weight average; the loop's periods, device and checkpoints."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from rcnn_trainer.config_base import Strict


class EMAConfig(Strict):
    enabled: bool = Field(False, description="Keep an exponential moving average of the weights; it is evaluated, "
                          "saved in every checkpoint (`ema`) and used by rcnn-eval and rcnn-predict.")
    decay: float = Field(0.9998, gt=0.0, lt=1.0, description="Its decay once warmed up (YOLOv5 / timm: 0.9998 "
                         "for long runs; about 1 - 10 / max_iters for runs of a few hundred iterations).")
    warmup: int = Field(2000, ge=0, description="The decay ramps as decay x (1 - exp(-updates / warmup)), so the "
                        "average follows the early weights closely (0 = the full decay from the first step).")


class SolverConfig(Strict):
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="SGD (momentum) or AdamW.")
    lr: float = Field(0.02, gt=0.0, description="Base learning rate (0.02 for 16 images with SGD).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD).")
    weight_decay: float = Field(1e-4, ge=0.0, description="L2 / decoupled weight decay.")
    weight_decay_norm_and_bias: bool = Field(False, description="Also decay norm weights and biases.")
    warmup_iters: int = Field(1000, ge=0, description="Linear warmup iterations.")
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0, description="lr multiplier at iteration 0.")
    schedule: Literal["multistep", "cosine", "constant"] = Field("multistep", description="lr after warmup.")
    steps: list[int] = Field(default_factory=list, description="Iterations at which multistep divides lr by 1/gamma.")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Multistep decay factor.")
    max_iters: int = Field(90000, ge=1, description="Training iterations.")
    max_epochs: Optional[int] = Field(
        None, ge=1, description="If set, train this many passes over the training set instead: max_iters becomes "
        "max_epochs x (training images // global batch). solver.steps stay in iterations.")
    clip_grad_norm: Optional[float] = Field(None, gt=0.0, description="Max total grad norm (null = off).")
    amp: bool = Field(False, description="Mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU.")
    amp_dtype: Literal["auto", "float16", "bfloat16"] = Field(
        "auto", description="Autocast dtype with amp: auto = float16 on CUDA, bfloat16 on CPU (AMX). float16 "
        "always runs with a GradScaler (its overflow steps are skipped and logged as amp_overflow, which is normal).")
    max_nonfinite_steps: int = Field(5, ge=1, description="Stop after this many non-finite steps in a row.")
    ema: EMAConfig = Field(default_factory=EMAConfig)

    @model_validator(mode="after")
    def _steps_in_range(self) -> "SolverConfig":
        if sorted(self.steps) != self.steps:
            raise ValueError(f"solver.steps must be increasing, got {self.steps}")
        if self.steps and self.steps[-1] >= self.max_iters:
            raise ValueError(f"solver.steps {self.steps} must be < solver.max_iters ({self.max_iters})")
        return self


class TrainConfig(Strict):
    log_period: int = Field(20, ge=1, description="Iterations between log lines.")
    eval_period: int = Field(0, ge=0, description="Iterations between evaluations (0 = only at the end).")
    checkpoint_period: int = Field(1000, ge=1, description="Iterations between checkpoints.")
    keep_checkpoints: int = Field(3, ge=1, description="Newest periodic checkpoints kept on disk.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    threads: Optional[int] = Field(None, ge=1, description="torch CPU threads (null = torch default).")
    channels_last: Union[bool, Literal["auto"]] = Field(
        "auto", description="NHWC memory layout for images, activations and conv weights. auto = on with "
        "autocast (bf16 on an AMX/AVX512-BF16 CPU, fp16 on CUDA), off in fp32 (NHWC measured 5% slower in fp32 "
        "on an AVX2 CPU).")
    compile: bool = Field(
        False, description="torch.compile (inductor) of the backbone + FPN, in place (checkpoints unchanged). "
        "Measured on a 2-core AVX512 CPU: compiling cost 15-41 s and saved nothing (training 0.42 vs 0.33 s/step "
        "eager, inference 0.158 vs 0.152): off; figures in docs/benchmarks.md, tools/compile_bench.py.")
    data_timeout_s: int = Field(
        300, ge=0, description="Watchdog: stop (exit 1, saying where it waited, after saving a checkpoint) when no "
        "training batch arrives for this many seconds; 0 = wait forever.")

