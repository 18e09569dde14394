"""python run_at.py SRC args...: run `ralmspec` from the source tree SRC (drops the editable finder)."""
import sys
src = sys.argv.pop(1)
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "") and "editable" not in repr(f)]
sys.path.insert(0, src)
import ralmspec
assert ralmspec.__file__.startswith(src), ralmspec.__file__
from ralmspec.cli import main
sys.exit(main(sys.argv[1:]))
