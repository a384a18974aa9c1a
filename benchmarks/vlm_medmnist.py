"""Train and evaluate a vision-language model on MedMNIST 2D subsets, one command per subset, and
print a table row per subset against the best published MedMNIST v2 test accuracy.

    python benchmarks/vlm_medmnist.py ../shared/data/medmnist/breastmnist.npz ../shared/data/medmnist/pneumoniamnist_variant.npz

Each subset runs exactly the README's two commands (same flags for every subset):
    nanoseek train-vlm --data FILE.npz --out runs/vlm-NAME --max-minutes 20 [extra flags]
    nanoseek eval-vlm --model runs/vlm-NAME --data FILE.npz --split test --views 16
eval-vlm runs with --views 16 (test-time augmentation, see train/vlm_eval.py), which also reports
the accuracy with one view, eval-vlm's default: the table gives both. Wall time includes
everything train-vlm does (tokenizer, data, validation). The machine is shared and noisy; the
training budget is a bound, not a measurement of speed.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

# MedMNIST v2 (Yang et al., 2023), best test ACC over its baselines, official splits.
BASELINES = {"breastmnist": (0.863, "ResNet-18 (28)"), "pneumoniamnist": (0.946, "Google AutoML Vision"),
             "pathmnist": (0.911, "ResNet-50 (224)"), "dermamnist": (0.768, "Google AutoML Vision"),
             "octmnist": (0.776, "ResNet-50 (224)"), "retinamnist": (0.531, "Google AutoML Vision"),
             "bloodmnist": (0.966, "Google AutoML Vision"), "tissuemnist": (0.703, "ResNet-18 (224)"),
             "organamnist": (0.951, "ResNet-18 (224)"), "organcmnist": (0.920, "ResNet-18 (224)"),
             "organsmnist": (0.785, "ResNet-18 (224)")}


# this interpreter's nanoseek, whether or not its virtual environment is on PATH
NANOSEEK = [sys.executable, "-m", "nanoseek.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="after --: more train-vlm flags")
    parser.add_argument("data", nargs="+", help="MedMNIST 2D .npz files")
    parser.add_argument("--runs", default="runs", help="folder for the checkpoints")
    parser.add_argument("--max-minutes", type=float, default=20.0)
    # everything after a lone "--" goes to train-vlm unchanged (argparse would take it as more data files)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    rows = []
    for data in args.data:
        name = Path(data).name.split(".")[0]
        out = Path(args.runs) / f"vlm-{name}"
        train = ["train-vlm", "--data", data, "--out", str(out), "--max-minutes", str(args.max_minutes), *extra]
        evaluate = ["eval-vlm", "--model", str(out), "--data", data, "--split", "test", "--views", "16"]
        print("$ nanoseek " + " ".join(train), flush=True)
        start = time.perf_counter()
        subprocess.run(NANOSEEK + train, check=True)
        minutes = (time.perf_counter() - start) / 60
        print("$ nanoseek " + " ".join(evaluate), flush=True)
        text = subprocess.run(NANOSEEK + evaluate, check=True, capture_output=True, text=True).stdout
        print(text, end="")
        with_views = float(re.search(r"^accuracy: ([\d.]+)$", text, re.M).group(1))
        auc = float(re.search(r"^auc: ([\d.]+)$", text, re.M).group(1))
        one_view = float(re.search(r"^accuracy with 1 view: ([\d.]+)$", text, re.M).group(1))
        # a copy whose splits differ from the official ones (a `_variant` file) has no comparable baseline
        key = None if "variant" in name else max((k for k in BASELINES if name.startswith(k)), key=len, default=None)
        base, by = BASELINES.get(key, (float("nan"), "-"))
        rows.append(f"| {name} | {minutes:.1f} | {one_view:.3f} | {with_views:.3f} | {auc:.3f} | {base:.3f} ({by}) |")
    print("\n| subset | training wall minutes | test accuracy (generated answers) | with --views 16 | test AUC (16 views) "
          "| best MedMNIST v2 ACC |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
