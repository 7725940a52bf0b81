"""Inference engines for deployment: PyTorch or OpenVINO, in fp32, bf16 or int8.

The one place that chooses how a model computes at deployment. Training and Grad-CAM stay in
PyTorch. A reduced precision is used only after it passed the quality gate on labelled images
(``verify``): macro AUROC within 0.003, accuracy among decided down by at most 0.5 points,
coverage changed by at most 2 points, argmax classes agreeing on at least 99% of the images.
The converted model and the verdict are cached in the cache folder, keyed by the model file's
hash, the engine's version, the precision and the input size; a verdict records the hashes of
the converted files and a hash of itself, checked on every use, so an engine changed or
truncated after it was verified is converted and verified again (with a warning), never run.
OpenVINO is optional (``pip install "thumbclf[openvino]"``); nothing here imports it unless it
is asked for, and its telemetry (and NNCF's) is never loaded: nothing is written to the home
folder or sent anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from thumbclf.core.decide import UNDECIDED, decide
from thumbclf.core.errors import ConfigError
from thumbclf.core.files import atomic_text, file_digest
from thumbclf.nn.engine import softmax
from thumbclf.nn.familiarity import WithFeatures, split

log = logging.getLogger(__name__)
MIN_VERIFY_IMAGES = 10
GATE = {"auroc": 0.003, "accuracy_decided": 0.005, "coverage": 0.02, "agreement": 0.99}
INSTALL = 'pip install "thumbclf[openvino]"'


# ---------------------------------------------------------------------------- the machine


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native(precision: str, device: torch.device) -> bool:
    """Whether this machine computes ``precision`` natively (else it is slower, not faster)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision == "bf16" and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    if precision == "bf16":
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    if precision == "int8":
        return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


def no_telemetry() -> None:
    """Keep OpenVINO's and NNCF's telemetry from loading: both fall back to a stub when the
    ``openvino_telemetry`` package cannot be imported, and so write no client id to
    ~/intel and send nothing."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment] - import fails
    else:  # imported by someone else first: decline consent, so it neither writes nor sends
        try:
            from openvino_telemetry.utils import opt_in_checker as checker

            checker.OptInChecker.check = lambda *a, **k: checker.ConsentCheckResult.DECLINED
        except (ImportError, AttributeError):
            pass


@lru_cache(maxsize=1)
def openvino_version() -> str | None:
    """OpenVINO's version, or None when it is not installed."""
    no_telemetry()
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


# ---------------------------------------------------------------------------- runners


@dataclass
class Runner:
    """A model that turns normalised NCHW float batches into logits (a float32 CPU tensor)."""

    engine: str
    precision: str
    forward: Callable[[torch.Tensor], torch.Tensor]

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).float().cpu()


def torch_runner(model: torch.nn.Module, device: torch.device, precision: str,
                 channels_last: bool) -> Runner:
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(x)
        return model(x)  # fp32: the reference arithmetic, on the CPU and on GPUs

    return Runner("torch", precision, forward)


def _ov_model(model: torch.nn.Module, size: int, cache: Path, calibration: Callable | None,
              precision: str):
    """The OpenVINO model (int8: quantised with NNCF on ``calibration()`` batches), cached."""
    no_telemetry()
    import openvino as ov

    xml = cache / "model.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(xml)
        except Exception as exc:  # noqa: BLE001 - truncated or damaged: convert it again
            log.warning("%s: the cached engine is unreadable (%s); converting it again", cache,
                        type(exc).__name__)
            shutil.rmtree(cache, ignore_errors=True)
    with warnings.catch_warnings():  # its tracer warns about torch.jit's future, not about us
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(model.cpu().eval(),
                                    example_input=torch.zeros(1, 3, size, size))
    if precision == "int8":
        try:
            import nncf
        except ImportError:
            raise ConfigError(f"precision int8 needs NNCF; {INSTALL}") from None
        batches = list(calibration()) if calibration is not None else []
        if not batches:
            raise ConfigError("precision: int8 needs readable deploy images to calibrate the "
                              "quantisation; use precision: auto, fp32 or bf16")
        ov_model = nncf.quantize(ov_model, nncf.Dataset(batches, lambda b: b.numpy()),
                                 preset=nncf.QuantizationPreset.MIXED,
                                 subset_size=sum(len(b) for b in batches),
                                 fast_bias_correction=False)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # both files, then one rename
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ov.save_model(ov_model, tmp / xml.name, compress_to_fp16=False)
    try:
        tmp.rename(cache)
    except OSError:  # another run cached it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return ov_model


def openvino_runner(model: torch.nn.Module, size: int, precision: str, cache: Path,
                    calibration: Callable | None = None) -> Runner:
    no_telemetry()
    import openvino as ov

    ov_model = _ov_model(model, size, cache, calibration, precision)
    hint = "bf16" if precision == "bf16" else "f32"  # int8 layers run int8 whatever the hint
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                         "PERFORMANCE_HINT": "THROUGHPUT"})

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(compiled(x.contiguous().numpy())[0])

    return Runner("openvino", precision, forward)


# ---------------------------------------------------------------------------- the gate


def gate(reference: np.ndarray, candidate: np.ndarray, y: np.ndarray, classes: tuple[str, ...],
         threshold: float) -> dict:
    """The quality gate's figures: reduced precision vs PyTorch fp32 on labelled images."""
    def figures(p: np.ndarray) -> dict:
        dec = np.array(decide(p, classes, threshold), dtype=object)
        decided = dec != UNDECIDED
        truth = np.array(classes, dtype=object)[y]
        present = np.unique(y)
        try:
            if len(present) < 2:
                raise ValueError
            sub = p[:, present] / p[:, present].sum(axis=1, keepdims=True)
            auroc = float(roc_auc_score(y, sub if len(present) > 2 else sub[:, 1],
                                        multi_class="ovr", labels=present)
                          if len(present) > 2 else roc_auc_score(y == present[1], sub[:, 1]))
        except ValueError:
            auroc = float("nan")
        return {"auroc": auroc, "coverage": float(decided.mean()),
                "accuracy_decided": float((dec[decided] == truth[decided]).mean())
                if decided.any() else float("nan")}

    ref, cand = figures(reference), figures(candidate)
    agreement = float((reference.argmax(1) == candidate.argmax(1)).mean())
    d_auroc = abs(cand["auroc"] - ref["auroc"]) if np.isfinite(ref["auroc"]) else 0.0
    d_acc = (ref["accuracy_decided"] - cand["accuracy_decided"]
             if np.isfinite(ref["accuracy_decided"]) and np.isfinite(cand["accuracy_decided"])
             else 0.0)
    d_cov = abs(cand["coverage"] - ref["coverage"])
    passed = (d_auroc <= GATE["auroc"] and d_acc <= GATE["accuracy_decided"]
              and d_cov <= GATE["coverage"] and agreement >= GATE["agreement"])
    return {"passed": bool(passed), "images": int(len(y)), "reference": ref, "candidate": cand,
            "auroc_change": d_auroc, "accuracy_decided_drop": d_acc, "coverage_change": d_cov,
            "argmax_agreement": agreement}


def describe_gate(g: dict) -> str:
    """The gate's figures in one line."""
    return (f"{g['images']} labelled images: macro AUROC change {g['auroc_change']:.4f} (max "
            f"{GATE['auroc']}), accuracy among decided down {100 * g['accuracy_decided_drop']:.1f} "
            f"points (max {100 * GATE['accuracy_decided']:.1f}), coverage change "
            f"{100 * g['coverage_change']:.1f} points (max {100 * GATE['coverage']:.0f}), argmax "
            f"agreement {100 * g['argmax_agreement']:.1f}% (min {100 * GATE['agreement']:.0f}%)")


# ---------------------------------------------------------------------------- choosing


def candidates(engine: str, precision: str, device: torch.device) -> list[tuple[str, str]]:
    """(engine, precision) pairs to try, fastest first; the last one is always PyTorch-exact."""
    if device.type == "cuda":
        if engine == "openvino":
            raise ConfigError("engine: openvino runs on the CPU; with device cuda use engine: "
                              "torch or auto")
        if precision == "int8":
            raise ConfigError("precision: int8 is for CPUs (OpenVINO); on a GPU use auto, fp32 "
                              "or bf16")
        if precision == "bf16" and not native("bf16", device):
            raise ConfigError("precision: bf16 is not computed natively by this GPU; use auto "
                              "or fp32")
        bf16 = [("torch", "bf16")] if precision != "fp32" and native("bf16", device) else []
        return bf16 + ([("torch", "fp32")] if precision != "bf16" else [])
    engines = ["openvino", "torch"] if engine == "auto" else [engine]
    if "openvino" in engines and openvino_version() is None:
        if engine == "openvino":
            raise ConfigError(f"engine: openvino is not installed; {INSTALL}, or use engine: "
                              "auto or torch")
        engines.remove("openvino")
    # auto never quantises: int8 needs a calibration pass and, with NNCF's default settings,
    # failed the quality gate on trained models; ask for it with precision: int8
    precisions = ["bf16", "fp32"] if precision == "auto" else [precision]
    pairs = []
    for p in precisions:
        if precision != "auto" or native(p, device):
            for e in engines:
                if e == "torch" and p == "int8":
                    continue
                if (e, p) == ("openvino", "fp32") and engine == "auto":
                    continue  # measured no faster than PyTorch fp32 here: not worth converting
                pairs.append((e, p))
    if precision != "auto":
        for e, p in pairs:
            if not native(p, device):
                raise ConfigError(f"precision: {p} is not computed natively by this CPU (no "
                                  f"{'AVX-512 BF16 or AMX' if p == 'bf16' else 'VNNI or AMX'}), "
                                  "so it would be slower, not faster; use auto or fp32")
        if not pairs:
            raise ConfigError(f"precision: {precision} needs engine: openvino ({INSTALL})")
    if ("torch", "fp32") not in pairs and precision == "auto":
        pairs.append(("torch", "fp32"))
    return pairs


def engine_files(folder: Path) -> dict[str, str]:
    """The sha256 of every file of a converted engine (model.xml, model.bin); {} when absent."""
    if not folder.is_dir():
        return {}
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _seal(verdict: dict) -> str:
    body = {k: v for k, v in verdict.items() if k != "seal"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sealed(verdict: dict, folder: Path) -> dict:
    """The verdict bound to what it verified: the engine files' hashes, and a hash of it all."""
    out = {**verdict, "files": engine_files(folder)}
    return {**out, "seal": _seal(out)}


def cached_verdict(verdict_file: Path, folder: Path, what: str) -> dict | None:
    """A cached verdict that still describes the engine files beside it, checked on every
    use; None (with the engine removed, to be converted and verified again, and a warning
    saying so) when it is unreadable, altered or the files changed since."""
    if not verdict_file.is_file():
        return None
    try:
        verdict = json.loads(verdict_file.read_text())
        ok = isinstance(verdict, dict) and verdict.get("seal") == _seal(verdict)
    except (OSError, ValueError):
        verdict, ok = None, False
    if not ok:
        why = "its verdict is unreadable or was altered"
    else:
        now = engine_files(folder)
        changed = sorted(set(now) ^ set(verdict["files"]) |
                         {k for k in now if verdict["files"].get(k) != now[k]})
        if not changed:
            return verdict
        why = f"{', '.join(changed)} changed since it was verified"
    log.warning("cache %s: the %s engine is not the one verified (%s); converting and verifying "
                "it again", folder, what, why)
    shutil.rmtree(folder, ignore_errors=True)
    verdict_file.unlink(missing_ok=True)
    return None


def cache_key(model_file: Path, engine: str, precision: str, size: int, verdict: str) -> str:
    """The converted model's key (file hash, engine version, precision, size, machine); with
    ``verdict`` (threshold, temperature, verification images) the key of a gate's verdict."""
    version = openvino_version() if engine == "openvino" else torch.__version__
    cpu = hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:8]
    text = (f"{file_digest(model_file)}|{engine}|{version}|{precision}|{size}|{platform.machine()}|"
            f"{cpu}|{verdict}")
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def choose(model, *, model_file: Path, size: int, channels_last: bool, device: torch.device,
           engine: str, precision: str, cache_dir: Path, verify: Callable | None,
           calibration: Callable | None, temperature: float, classes: tuple[str, ...],
           threshold: float, verify_id: str = "") -> tuple[Runner, str]:
    """The fastest runner whose quality was verified; also what was decided and why.

    ``verify()`` returns (normalised images, labels) of labelled images, or None when there
    are none; ``calibration()`` yields unlabelled normalised batches (int8 calibration).
    """
    exact = torch_runner(model, device, "fp32", channels_last)
    pairs = candidates(engine, precision, device)
    explicit = precision != "auto"
    notes: list[str] = []
    for eng, prec in pairs:
        if (eng, prec) == ("torch", "fp32"):
            return exact, "; ".join(notes + ["PyTorch fp32"])
        try:
            return _try(model, eng, prec, model_file=model_file, size=size, device=device,
                        channels_last=channels_last, cache_dir=cache_dir, verify=verify,
                        verify_id=verify_id, calibration=calibration, temperature=temperature,
                        classes=classes, threshold=threshold, exact=exact, notes=notes)
        except _Refused as exc:
            if explicit:
                raise ConfigError(f"precision: {prec}: {exc}; use precision: auto or fp32"
                                  ) from None
            notes.append(str(exc))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failing engine must not end an auto run
            if explicit or engine != "auto":
                raise ConfigError(f"engine: {eng} {prec} failed ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                  "use engine: auto or torch") from None
            log.debug("%s %s failed", eng, prec, exc_info=True)
            notes.append(f"{eng} {prec} failed ({type(exc).__name__}); the traceback is in run.log")
    return exact, "; ".join(notes + ["PyTorch fp32"])


class _Refused(Exception):
    """A candidate that was not verified or did not pass the gate."""


def _try(model, eng, prec, *, model_file, size, device, channels_last, cache_dir, verify,
         verify_id, calibration, temperature, classes, threshold, exact, notes) -> tuple[Runner, str]:
    variant = "features" if isinstance(model, WithFeatures) else ""  # another exported graph
    folder = cache_dir / "engines" / cache_key(model_file, eng, prec, size, variant)
    verdict_file = (cache_dir / "engines" / "verdicts" /
                    f"{cache_key(model_file, eng, prec, size, f'{threshold}|{temperature}|{verify_id}|{GATE}|{variant}')}.json")
    verdict = cached_verdict(verdict_file, folder, f"{eng} {prec}")
    if verdict is None and eng == "openvino" and prec == "fp32":
        # the same arithmetic as PyTorch fp32: no gate, but converted afresh and bound to its files
        shutil.rmtree(folder, ignore_errors=True)
        runner = _runner(model, eng, prec, size, device, channels_last, folder, calibration)
        atomic_text(json.dumps(sealed({"passed": True, "exact": True}, folder), indent=1),
                    verdict_file)
        return runner, "; ".join(notes + [runner.name])
    if verdict is None:
        data = verify() if verify is not None else None
        if data is None:
            raise _Refused(f"{eng} {prec} not verified: fewer than {MIN_VERIFY_IMAGES} labelled "
                           "images to check it on (give verify_data, or deploy a model of a "
                           "training results folder, whose validation split is used)")
        images, y = data
        runner = _runner(model, eng, prec, size, device, channels_last, folder, calibration)
        reference = softmax(split(_logits(exact, images), len(classes))[0], temperature)
        verdict = gate(reference, softmax(split(_logits(runner, images), len(classes))[0],
                                          temperature), y, classes, threshold)
        atomic_text(json.dumps(sealed(verdict, folder), indent=1), verdict_file)
        log.info("quality gate for %s %s: %s: %s", eng, prec,
                 "passed" if verdict["passed"] else "FAILED", describe_gate(verdict))
        if verdict["passed"]:
            return runner, "; ".join(notes + [f"{runner.name} (verified on "
                                              f"{describe_gate(verdict)})"])
    elif verdict["passed"]:
        runner = _runner(model, eng, prec, size, device, channels_last, folder, calibration)
        how = "" if verdict.get("exact") else f" (verified earlier on {describe_gate(verdict)})"
        return runner, "; ".join(notes + [f"{runner.name}{how}"])
    raise _Refused(f"{eng} {prec} refused by the quality gate: {describe_gate(verdict)}")


def _runner(model, engine, precision, size, device, channels_last, folder, calibration) -> Runner:
    if engine == "openvino":
        return openvino_runner(model, size, precision, folder, calibration)
    return torch_runner(model, device, precision, channels_last)


def _logits(runner: Runner, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([runner(images[i:i + batch]) for i in range(0, len(images), batch)]).numpy()
