"""Grad-CAM throughput: medxai against pytorch-grad-cam and Captum on the same model, batch, targets and device.

Each implementation produces the same thing from the same inputs: for a batch of images and one target class per
image (each image's predicted class, computed once beforehand and given to all three), min-max normalised Grad-CAM
maps at the input size, on the CPU (pytorch-grad-cam returns NumPy arrays; medxai and Captum maps are copied
to the host, so every timing includes getting the maps where a caller can use them). The model is a torchvision
ResNet in eval mode with seeded random weights (throughput does not depend on the weights' values), target layer
``layer4``.

* medxai: ``GradCAM(model, "layer4")(x, target=classes)``. On the CPU it hands the batch to the model in
  channels-last layout (its default there); ``medxai-contiguous`` is the same call with ``channels_last=False``,
  to show how much of the difference that layout makes and how much the rest (autograd recorded only from the
  target layer on, backward only to it, everything on the device).
* pytorch-grad-cam: ``GradCAM(model, [model.layer4])(x, [ClassifierOutputTarget(c) ...])`` (its own resize and
  normalisation).
* Captum: ``LayerGradCam(model, model.layer4).attribute(x, target=classes, relu_attributions=True)``, then
  ``LayerAttribution.interpolate`` to the input size and per-image min-max normalisation in torch.

The input-attribution methods (``--attribution``, default all six) are timed the same way, each against Captum's own
call on the same batch, classes and settings (medxai's defaults: Integrated Gradients 32 Gauss-Legendre steps from a
zero baseline; GradientSHAP 32 samples over zero and blurred references, one seeded call per image; Occlusion with a
1/8-side window and half-window stride; LIME (ridge surrogate) and KernelSHAP with 256 samples over about 50 SLIC
superpixels, one seeded call per image, the segments computed inside both timings). ``medxai-<method>`` is
``get_cam_method(<method>)(model)(x, target=classes).maps``; ``captum-<method>`` is Captum's ``attribute`` reduced to
the same min-max normalised map in torch. RISE is not in Captum: it is timed alone.

Implementations are timed in interleaved rounds (each round times every implementation once, after warm-up), so that
a change in machine load hits all of them alike; the reported figure is the median over rounds. The maps of the
three implementations are compared (maximum absolute difference) before timing.

Prints one JSON object per implementation (``impl``, ``model``, ``batch``, ``device``, ``img_per_s``, ...) and a final
one with ``speedup_vs_pytorch_grad_cam``, each attribution method's ``speedup_vs_captum`` and the largest map
difference from Captum's; ``--out`` also writes them to a JSON file.

Examples:
    python benchmarks/explain_throughput.py --device cpu --model resnet18 --batch 32
    python benchmarks/explain_throughput.py --device cuda --model resnet50 --batch 64 --out results/gpu.json
    python benchmarks/explain_throughput.py --impls "" --attribution integratedgradients,rise --size 64 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision

IMPLEMENTATIONS = ("medxai", "medxai-contiguous", "pytorch-grad-cam", "captum")
ATTRIBUTION_METHODS = ("integratedgradients", "gradientshap", "occlusion", "rise", "lime", "kernelshap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="input side in pixels")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation first")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per implementation per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                        help="comma-separated subset of the Grad-CAM implementations to run ('' for none)")
    parser.add_argument("--attribution", default=",".join(ATTRIBUTION_METHODS),
                        help="comma-separated input-attribution methods, each against Captum ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write every JSON object to this file")
    parser.add_argument("--note", help="free text stored with the results (machine, load, caveats)")
    return parser


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(1e-7)).view_as(maps)


def make_runners(model: torch.nn.Module, classes: list[int], impls: list[str]) -> dict[str, Callable]:
    """One callable per implementation: batch -> (B, H, W) NumPy maps in [0, 1] on the host."""
    runners: dict[str, Callable] = {}
    if "medxai" in impls:
        from medxai.explain import GradCAM

        medxai_cam = GradCAM(model, "layer4")

        def run_medxai(x: torch.Tensor) -> np.ndarray:
            return medxai_cam(x, target=classes).maps.cpu().numpy()

        runners["medxai"] = run_medxai
    if "medxai-contiguous" in impls:
        from medxai.explain import GradCAM

        contiguous_cam = GradCAM(model, "layer4", channels_last=False)

        def run_medxai_contiguous(x: torch.Tensor) -> np.ndarray:
            return contiguous_cam(x, target=classes).maps.cpu().numpy()

        runners["medxai-contiguous"] = run_medxai_contiguous
    if "pytorch-grad-cam" in impls:
        from pytorch_grad_cam import GradCAM as PGCGradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc_cam = PGCGradCAM(model=model, target_layers=[model.layer4])
        targets = [ClassifierOutputTarget(c) for c in classes]

        def run_pgc(x: torch.Tensor) -> np.ndarray:
            return pgc_cam(input_tensor=x, targets=targets)

        runners["pytorch-grad-cam"] = run_pgc
    if "captum" in impls:
        from captum.attr import LayerAttribution, LayerGradCam

        captum_cam = LayerGradCam(model, model.layer4)
        target_tensor = torch.tensor(classes)

        def run_captum(x: torch.Tensor) -> np.ndarray:
            attributions = captum_cam.attribute(x, target=target_tensor.to(x.device), relu_attributions=True)
            maps = LayerAttribution.interpolate(attributions, tuple(x.shape[2:]), "bilinear")[:, 0]
            return _minmax(maps.detach()).cpu().numpy()

        runners["captum"] = run_captum
    unknown = sorted(set(impls) - set(IMPLEMENTATIONS))
    if unknown:
        raise SystemExit(f"unknown implementation(s) {unknown}; choose from {IMPLEMENTATIONS}")
    return runners


def _captum_call(name: str, model: torch.nn.Module, x: torch.Tensor, classes: list[int], seed: int) -> torch.Tensor:
    """Captum's own call for attribution method ``name`` with medxai's default settings: ``(B, C, H, W)``."""
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import GradientShap, IntegratedGradients, KernelShap, Lime, Occlusion

    from medxai.explain._attribution import reference_images, superpixels

    targets = torch.tensor(classes, device=x.device)
    if name == "integratedgradients":
        return IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=targets, n_steps=32,
                                                    internal_batch_size=max(64, x.shape[0]))
    if name == "occlusion":
        window = max(1, round(x.shape[-1] / 8))
        stride = max(1, window // 2)
        return Occlusion(model).attribute(x, sliding_window_shapes=(x.shape[1], window, window),
                                          strides=(x.shape[1], stride, stride), baselines=0.0, target=targets,
                                          perturbations_per_eval=max(1, 64 // x.shape[0]))
    per_image = []
    for index, image in enumerate(x.split(1)):
        torch.manual_seed(seed)
        np.random.seed(seed)
        if name == "gradientshap":
            references = torch.cat([torch.zeros_like(image), reference_images(image, "blur")])
            per_image.append(GradientShap(model).attribute(image, baselines=references, n_samples=32,
                                                           target=classes[index]))
        else:
            explainer = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0)) if name == "lime" else KernelShap(
                model)
            segments = superpixels(image[0], 50, 0.1)
            per_image.append(explainer.attribute(image, baselines=0.0, feature_mask=segments[None, None],
                                                 n_samples=256, perturbations_per_eval=64, target=classes[index]))
    return torch.cat(per_image)


def make_attribution_runners(model: torch.nn.Module, classes: list[int], methods: list[str],
                             seed: int) -> dict[str, Callable]:
    """``medxai-<method>`` and ``captum-<method>`` callables: batch -> (B, H, W) NumPy maps in [0, 1] on the host."""
    from medxai.explain import get_cam_method
    from medxai.explain._attribution import pixel_map

    unknown = sorted(set(methods) - set(ATTRIBUTION_METHODS))
    if unknown:
        raise SystemExit(f"unknown attribution method(s) {unknown}; choose from {ATTRIBUTION_METHODS}")
    runners: dict[str, Callable] = {}
    for name in methods:
        method = get_cam_method(name)(model, seed=seed)
        runners[f"medxai-{name}"] = lambda x, method=method: method(x, target=classes).maps.cpu().numpy()
        if name == "rise":
            continue  # not in Captum

        def run_captum(x: torch.Tensor, name: str = name, method=method) -> np.ndarray:
            attributions = _captum_call(name, model, x, classes, seed).detach()
            return _minmax(pixel_map(attributions, method.channels, method.sign)).cpu().numpy()

        runners[f"captum-{name}"] = run_captum
    return runners


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(weights=None).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        classes = model(x).argmax(1).tolist()  # the same targets for every implementation
    impls = [name.strip() for name in args.impls.split(",") if name.strip()]
    attribution = [name.strip() for name in args.attribution.split(",") if name.strip()]
    runners = make_runners(model, classes, impls)
    runners.update(make_attribution_runners(model, classes, attribution, args.seed))

    outputs = {name: runner(x) for name, runner in runners.items()}  # also the first warm-up call
    reference = outputs.get("medxai")
    agreement = {name: float(np.abs(maps - reference).max()) for name, maps in outputs.items()
                 if reference is not None and name in IMPLEMENTATIONS and name != "medxai"}
    agreement.update({f"captum-{name}": float(np.abs(outputs[f"captum-{name}"] - outputs[f"medxai-{name}"]).max())
                      for name in attribution if f"captum-{name}" in outputs})
    for _ in range(max(0, args.warmup - 1)):
        for runner in runners.values():
            runner(x)
            _synchronize(device)

    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(args.iters):
                runner(x)
            _synchronize(device)
            seconds[name].append(time.perf_counter() - started)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    records = []
    for name, times in seconds.items():
        rates = [args.batch * args.iters / t for t in times]
        record = {
            "impl": name,
            "model": args.model,
            "batch": args.batch,
            "size": args.size,
            "device": device.type,
            "device_name": device_name,
            "img_per_s": round(statistics.median(rates), 2),
            "img_per_s_rounds": [round(rate, 2) for rate in rates],
            "threads": torch.get_num_threads(),
        }
        records.append(record)
        print(json.dumps(record), flush=True)
    rate = {record["impl"]: record["img_per_s"] for record in records}
    summary = {
        "summary": True,
        "model": args.model,
        "batch": args.batch,
        "size": args.size,
        "device": device.type,
        "device_name": device_name,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "max_abs_diff_vs_medxai": {name: round(value, 8) for name, value in agreement.items()},
        "attribution_speedup_vs_captum": {
            name: round(rate[f"medxai-{name}"] / rate[f"captum-{name}"], 2)
            for name in attribution if f"captum-{name}" in rate
        },
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if "medxai" in rate and "pytorch-grad-cam" in rate:
        summary["speedup_vs_pytorch_grad_cam"] = round(rate["medxai"] / rate["pytorch-grad-cam"], 2)
    if "medxai" in rate and "captum" in rate:
        summary["speedup_vs_captum"] = round(rate["medxai"] / rate["captum"], 2)
    if "medxai-contiguous" in rate and "pytorch-grad-cam" in rate:
        summary["speedup_vs_pytorch_grad_cam_contiguous_layout"] = round(
            rate["medxai-contiguous"] / rate["pytorch-grad-cam"], 2)
    print(json.dumps(summary), flush=True)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/explain_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
        document = {"command": command, "note": args.note, "results": records, "summary": summary}
        path.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
