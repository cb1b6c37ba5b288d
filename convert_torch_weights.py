"""Convert a released PyTorch ESC checkpoint into a codec directory for JAX.

  python convert_torch_weights.py --checkpoint esc9kbps_base/model.pth --output esc_base_jax
  python -c "import esc_jax; codec = esc_jax.load('esc_base_jax')"

No PyTorch needed: the .pth is read with a restricted unpickler that accepts only
tensors and plain containers, so a malicious checkpoint cannot run code.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True, help="released model.pth")
  p.add_argument("--config", default=None,
                 help="release config.yaml or JSON/YAML model keywords (default: config.yaml beside --checkpoint)")
  p.add_argument("--output", required=True, help="codec directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
  args = p.parse_args(argv)

  from esc_jax.convert import convert_checkpoint
  try:
    out, n = convert_checkpoint(args.checkpoint, args.output, args.config, args.overwrite)
  except (ValueError, OSError) as e:  # ConversionError, CheckpointReadError, UnsafeCheckpointError, ...
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {args.checkpoint} ({n:,} parameters) -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
