"""
Write the Middlebury 2014 Motorcycle left view (scikit-image's copy) as an RGB-D frame folder that scenes.load_rgbd and
`data.py --rgbd` read: metric depth from the ground-truth disparity, instances cut at depth discontinuities and
labelled at hand-placed seeds (dataengine/middlebury.py says how). Needs `pip install scikit-image`.

    python tools/motorcycle.py frames/motorcycle
    python data.py spatial --rgbd frames/motorcycle --n 8 --out data/motorcycle && python data.py check data/motorcycle
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataengine.middlebury import write_frame  # noqa: E402
from dataengine.scenes import load_rgbd  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description="the Middlebury Motorcycle left view as an RGB-D frame folder")
    ap.add_argument("out", help="frame folder to write (rgb.png, depth.npy, intrinsics.json, instance.png, "
                    "labels.json, middlebury.json)")
    args = ap.parse_args(argv)
    try:
        frame = load_rgbd(write_frame(args.out))         # read back through the validating reader
    except ImportError as e:
        raise SystemExit(str(e)) from e
    known = frame["depth"] > 0
    print(f"{args.out}: {frame['rgb'].shape[1]}x{frame['rgb'].shape[0]}, depth {frame['depth'][known].min():.2f}-"
          f"{frame['depth'].max():.2f} m on {known.mean():.1%} of pixels, instances {frame['labels']}")


if __name__ == "__main__":
    main()
