#!/usr/bin/env bash
# Issue 14's GPU measurements in one command, sized for one lent H200 call (~5-8 min of its 10; each part is
# capped by `timeout` so one slow part cannot take the rest with it). Each part's output goes to stdout and to
# $OUT/<part>.txt, which the device tool brings back.
#
#   on the device:  bash bench/device_issue14.sh            (run from the repository root; OUT set by the tool)
#   here, first:    SMALL=1 OUT=/tmp/dev14 bash bench/device_issue14.sh   (tiny sizes on the CPU, ~3 min: checks
#                   that every command and option still parses and runs before device time is spent)
#
# Parts (issue 14's "If a GPU is lent" list):
#   probe_<arch>_<precision>  probe/bare efficiency, 5 ResNet20×4 and 5 VGG11-BN, 50,000 32² images (random: the
#                             forward and the statistics do not depend on the pixels), bf16 and fp32
#   probe_alexnet             5 torchvision AlexNets on 224² images, bf16: the probe's images/s, for the ImageNet
#                             projection (1.28M images ÷ the slower of this rate and the decode rate)
#   passes                    statistics ÷ forward of matching, REPAIR, evaluation and covariance on the GPU
#   decode                    JPEG decode images/s at 224 px per core, with workers, and batched on the GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ "${SMALL:-0}" = 1 ]; then
  DEV=cpu; THREADS=2; N=512; NA=32; NP=512; NPA=32; ND=48; BATCH=128; W="0 1"; PW="1"; LIMIT=300
else
  DEV=cuda; THREADS=16; N=50000; NA=4096; NP=10000; NPA=2048; ND=1024; BATCH=1000; W="0 4 8 16"; PW="8 16"
  LIMIT=120
fi

part() {  # part NAME COMMAND...: run under the time cap, tee to $OUT/NAME.txt, say how it ended
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$LIMIT" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available())"; nproc; } 2>&1 | tee "$OUT/machine.txt"

for prec in bfloat16 float32; do
  part "probe_resnet20x4_$prec" python3 bench/probe_throughput.py --device "$DEV" --threads "$THREADS" \
    --arch resnet20 --width 4 --models 5 --images "$N" --batch-size "$BATCH" --repeats 2 --precision "$prec"
  part "probe_vgg11_$prec" python3 bench/probe_throughput.py --device "$DEV" --threads "$THREADS" \
    --arch vgg11_bn --models 5 --images "$N" --batch-size "$BATCH" --repeats 2 --precision "$prec"
done
part probe_alexnet python3 bench/probe_throughput.py --device "$DEV" --threads "$THREADS" --arch tv_alexnet \
  --size 224 --models 5 --images "$NA" --batch-size 256 --repeats 2 --precision bfloat16
part passes python3 bench/data_passes.py --stats --device "$DEV" --threads "$THREADS" \
  --models resnet20 vgg11_bn tv_alexnet --images "$NP" --alex-images "$NPA" --batch-size 500 --repeats 2
# shellcheck disable=SC2086  # the worker lists are meant to split
part decode python3 bench/decode.py --device "$DEV" --threads "$THREADS" --images "$ND" --batch-size 128 \
  --workers $W --models 5 --pass-workers $PW --repeats 2
