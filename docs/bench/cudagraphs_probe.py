import time, torch
from bentosvd.weights.random_weights import build_synthetic
unet = build_synthetic(25, device="cuda", dtype=torch.float16)["unet"]
unet.compile(dynamic=False, mode="reduce-overhead")
x = torch.randn(2, 25, 8, 72, 128, device="cuda", dtype=torch.half)
t = torch.tensor(700.0, device="cuda"); e = torch.randn(2, 1, 1024, device="cuda", dtype=torch.half)
a = torch.randn(2, 3, device="cuda", dtype=torch.half)
with torch.no_grad():
    for i in range(5):
        torch.cuda.synchronize(); s = time.perf_counter()
        unet(x, t, encoder_hidden_states=e, added_time_ids=a, return_dict=False)
        torch.cuda.synchronize(); print("call", i, time.perf_counter() - s, flush=True)
