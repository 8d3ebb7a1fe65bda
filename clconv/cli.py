"""The `clconv` command: `clconv info`, `clconv bench`, `clconv tune`."""
from __future__ import annotations

import argparse
import sys

from . import algorithms, capabilities, options, programs, store
from .capabilities import device_info
from .device import (ForkedProcessError, NoDeviceError, all_devices, choose_device,
                     compile_failure, queue_for)


SUITE_HELP = ("a suite name (standard, resnet50, mobilenet_v2, vgg16) or a suite JSON file "
              "(default: standard)")


def positive_int(text):
    """An argparse type: a positive integer (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _size(nbytes):
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**10:.0f} KiB"


def cmd_info(args):
    chosen = choose_device(args.device)
    last_platform = None
    for platform, device in all_devices():
        if platform != last_platform:
            print(f"platform: {platform.name.strip()} ({platform.version.strip()})")
            last_platform = platform
        info = device_info(device)
        mark = "*" if device == chosen else " "
        print(f" {mark} {info.name}  [{'CPU' if info.is_cpu else 'GPU/accelerator'}, "
              f"{info.vendor}, driver {info.driver_version}]")
        failure = compile_failure(device)
        if failure is not None:
            print(f"      cannot compile kernels (not used): {failure}")
        if device == chosen:
            print(f"      compute units {info.compute_units}, max work-group "
                  f"{info.max_work_group_size} {info.max_work_item_sizes}, local memory "
                  f"{_size(info.local_mem_size)}, global memory {_size(info.global_mem_size)}, "
                  f"max allocation {_size(info.max_mem_alloc_size)}")
            print(f"      fp16 (cl_khr_fp16) {'yes' if info.fp16 else 'no'}, fp64 "
                  f"{'yes' if info.fp64 else 'no'}; float16 works either way (half storage, "
                  "float32 arithmetic)")
            print("      " + info.capabilities.describe().replace("\n", "\n      "))
            if info.is_cpu:
                print(f"      processor {info.processor or 'unknown'} (a shipped database "
                      "that names another processor model does not apply)")
            print(f"      capabilities probed once per device and driver: "
                  f"{capabilities.cache_path(info)}")
    print("* = the device clconv uses (CLCONV_DEVICE=substring or --device to choose)")
    print(f"kernel sources {programs.sources_hash()} in {programs.kernels_dir()}; per "
          "algorithm (what its tuned entries are keyed by): " + ", ".join(
              f"{name} {store.sources_of(name)}" for name in algorithms.ALGORITHMS))
    info = device_info(chosen)
    path = store.cache_path(info)
    print(f"tuning mode {options.tuning_mode()} (CLCONV_TUNE); cache {path}: "
          f"{len(store.cache_entries(info))} problems tuned for this device"
          f"{'' if path.exists() else ' (no file yet)'}")
    print(f"Winograd F(2x2,3x3): {'allowed' if options.allow_winograd() else 'off'} "
          "(opt-in: CLCONV_ALLOW_WINOGRAD=1 or clconv.set_allow_winograd(True))")
    stale = store.other_cache_files(info)
    if stale:
        print(f"      {len(stale)} older cache file(s) of this device, from another driver or an "
              "older clconv, are ignored")
    print(f"shipped tuning databases: {len(store.database_entries(info))} problems match this "
          f"device ({store.databases_dir()})")
    return 0


WINOGRAD_HELP = ("allow Winograd F(2x2,3x3) for 3x3 stride-1 layers (different rounding and "
                 "inf/NaN spread; default: CLCONV_ALLOW_WINOGRAD, else off)")


def cmd_bench(args):
    from . import bench, peak
    queue = queue_for(args.device)
    if args.peak:
        print(peak.report(peak.measure(queue), device_info(queue.device).name))
        return 0
    if args.models:
        from . import bench_models
        bench_models.main(queue, bench_models.parse_names(args.models),
                          batches=(args.batch,) if args.batch else bench_models.BATCHES,
                          size=args.size, repeats=args.repeats or 5, train=not args.no_train)
        return 0
    _, ok = bench.main(queue, suite=args.suite, only=args.only, batch=args.batch,
                       repeats=args.repeats or 10, with_torch=not args.no_torch,
                       with_ort=not args.no_ort,
                       backward=args.backward, json_path=args.json)
    return 0 if ok else 1


def cmd_tune(args):
    from . import tune_suite
    budget = options.check_budget(args.budget)
    _, ok = tune_suite.main(queue_for(args.device), suite=args.suite, only=args.only,
                       batch=args.batch, budget=budget, retune=args.retune, export=args.export,
                       backward=args.backward)
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="clconv", description="torch.nn.Conv2d on OpenCL")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list OpenCL devices and the chosen one's limits")
    info.add_argument("--device", help="device name substring (default: CLCONV_DEVICE, "
                      "else the first GPU, else any device)")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="check and time the standard layer suite")
    bench.add_argument("--device", help="device name substring")
    bench.add_argument("--suite", help=SUITE_HELP)
    bench.add_argument("--only", help="only layers whose name contains this")
    bench.add_argument("--batch", type=positive_int, help="override every layer's batch size")
    bench.add_argument("--repeats", type=positive_int,
                       help="timed runs per layer (default 10) or model (default 5)")
    bench.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    bench.add_argument("--no-ort", action="store_true",
                       help="skip the onnxruntime comparison (made when it is installed)")
    bench.add_argument("--backward", action="store_true",
                       help="also the input and weight gradients (torch: torch.nn.grad)")
    bench.add_argument("--peak", action="store_true",
                       help="only measure the device's float32 FMA peak (the %% of peak column)")
    bench.add_argument("--json", metavar="FILE", help="also write the raw numbers as JSON")
    bench.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    bench.add_argument("--models", metavar="NAMES",
                       help="instead of layers, whole torchvision models converted against "
                       "torch eager: comma-separated names or 'all' (resnet50, mobilenet_v2, "
                       "efficientnet_b0, convnext_tiny); needs the models extra")
    bench.add_argument("--size", type=positive_int, default=224,
                       help="--models: image size in pixels (default 224)")
    bench.add_argument("--no-train", action="store_true",
                       help="--models: inference only, no training step")
    bench.set_defaults(func=cmd_bench)
    tune = sub.add_parser("tune", help="tune a layer suite for this device and remember it")
    tune.add_argument("--device", help="device name substring")
    tune.add_argument("--suite", help=SUITE_HELP)
    tune.add_argument("--only", help="only layers whose name contains this")
    tune.add_argument("--batch", type=positive_int, help="override every layer's batch size")
    tune.add_argument("--budget", type=float, help="seconds per layer (default: "
                      f"CLCONV_TUNE_BUDGET, else {options.DEFAULT_BUDGET:g})")
    tune.add_argument("--backward", action="store_true",
                      help="also tune each layer's input and weight gradients")
    tune.add_argument("--retune", action="store_true",
                      help="tune layers already in the cache again (default: re-measure them)")
    tune.add_argument("--export", metavar="FILE",
                      help="also write this device's tuned entries as a shareable database")
    tune.add_argument("--winograd", action="store_true", help=WINOGRAD_HELP)
    tune.set_defaults(func=cmd_tune)
    args = parser.parse_args(argv)
    if getattr(args, "winograd", False):       # bench and tune
        options.set_allow_winograd(True)
    try:
        return args.func(args)
    except (NoDeviceError, ForkedProcessError, ValueError, store.CacheWriteError) as err:
        print(f"clconv: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
