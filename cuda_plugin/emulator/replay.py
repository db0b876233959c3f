"""The TSan pass over recorded plugin calls: builds the emulated plugin with -fsanitize=thread and replay.cpp into
an instrumented program (TSan needs an instrumented main program: Python with libtsan preloaded crashes), then
replays every call recorded in DIR in three thread orders. TSan reports races between the threads of a block
(each a TSan fiber) and between blocks; replay.cpp checks the outputs are the same bits in every order.

    VOLCONV_CUDA_EMULATOR=1 VOLCONV_CUDA_RECORD=DIR python -m pytest -m cuda -k every_kernel_once   # record
    python cuda_plugin/emulator/replay.py DIR                                                        # replay

Exit status: replay's (0: no race, no difference), 2 for nothing recorded."""
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build  # noqa: E402  (this directory's build.py)


def main(argv):
    if len(argv) != 1:
        print(__doc__)
        return 2
    records = sorted(glob.glob(os.path.join(argv[0], "*.vcr")))
    if not records:
        print(f"replay: no recorded calls (*.vcr) in {argv[0]}")
        return 2
    library = build.build(sanitize="thread", opt="-O1")
    program = os.path.join(build.cache_dir(), "vc_replay_tsan")
    build._run(["g++", "-std=c++20", "-O1", "-g", "-fsanitize=thread", os.path.join(HERE, "replay.cpp"), "-ldl"],
               program)
    env = dict(os.environ, TSAN_OPTIONS=os.environ.get("TSAN_OPTIONS", "halt_on_error=1 exitcode=66"))
    return subprocess.run([program, library, *records], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
