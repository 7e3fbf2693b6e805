import subprocess, sys, torch, os
if len(sys.argv) > 1:
    in_so, fmt = sys.argv[1] == "1", (sys.argv[2] if sys.argv[2] != "none" else None)
    class M(torch.nn.Module):
        def __init__(s):
            super().__init__(); s.l = torch.nn.Linear(64, 64); s.c = torch.nn.Conv2d(4, 4, 3, padding=1)
            s.register_buffer("k", torch.tensor(0.5))
        def forward(s, x, y): return s.l(x) * s.k, s.c(y)
    m = M().cuda().half().eval()
    args = (torch.randn(8, 64, device="cuda", dtype=torch.half), torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.half))
    with torch.no_grad():
        ep = torch.export.export(m, args, strict=False)
        cfg = {"aot_inductor.package_constants_in_so": in_so}
        if fmt: cfg["aot_inductor.package_constants_on_disk_format"] = fmt
        p = torch._inductor.aoti_compile_and_package(ep, package_path=f"/tmp/probe-{in_so}-{fmt}.pt2", inductor_configs=cfg)
        print("compiled", os.path.getsize(p), flush=True)
        r = torch._inductor.aoti_load_package(p)
        print("loaded", flush=True)
        sd = {**dict(m.named_parameters()), **dict(m.named_buffers())}
        r.load_constants({k: sd[k] for k in r.get_constant_fqns()}, check_full_update=True, user_managed=True)
        out = r(*args); ref = m(*args)
        print("ran", (out[0] - ref[0]).abs().max().item(), flush=True)
        # graph capture
        g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s): r(*args)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g): o = r(*args)
        g.replay(); torch.cuda.synchronize(); print("graph ok", (o[0] - ref[0]).abs().max().item(), flush=True)
else:
    for in_so, fmt in (("0", "none"), ("1", "none"), ("0", "pickle_weights"), ("0", "binary_blob")):
        done = subprocess.run([sys.executable, __file__, in_so, fmt], capture_output=True, text=True)
        print(f"in_so={in_so} fmt={fmt}: rc={done.returncode}", done.stdout.strip().replace("\n", " | "),
              "|", done.stderr.strip().splitlines()[-1:] , flush=True)
