import json, sys, time
from pathlib import Path
import pneumonia.flower.launch as launch
launch.APP_DIR = Path(__file__).parent  # this folder is the Flower App
work = Path("/tmp/secagg_probe_work"); work.mkdir(exist_ok=True)
t0 = time.time()
with launch.Federation(work) as fed:
    fed.start_superlink()
    for j in range(3):
        fed.start_supernode(f"supernode-{j}", {"partition-id": j}, threads=1)
    status = fed.submit({}, echo=print, timeout_s=400)
print(json.dumps(status, indent=1))
print(f"total wall {time.time()-t0:.1f}s")
