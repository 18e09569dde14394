import json, glob, os, statistics
rows = {}
for f in sorted(glob.glob('experiments/results/2026-12-05-os3-async/*/*.json')):
    side = f.split('/')[-2]; name = os.path.basename(f)[:-5]; wl = name.rsplit('-', 1)[0]
    if name.startswith('serve-'):
        continue  # load tests: their own table in README.md
    d = json.load(open(f))
    if 'summary' in d:
        sm = d['summary']
        rows.setdefault((wl, 'knnlm async'), {}).setdefault(side, []).append((sm['speedup'], sm['mean_stride'], None, sm['limit']))
    elif 'variants' in d:
        for v in d['variants']:
            rows.setdefault((wl, v['variant']), {}).setdefault(side, []).append((v['speedup'], v['mean_stride'], v['overlap'], v['limit']))
for (wl, var), sides in rows.items():
    def fmt(side):
        xs = sides.get(side, [])
        if not xs:
            return "-"
        return ", ".join(f"{x[0]:.2f}x" for x in xs) + f" (mean {statistics.fmean(x[0] for x in xs):.2f}x; stride {statistics.fmean(x[1] for x in xs):.2f})"
    lim = statistics.fmean(x[3] for s in sides.values() for x in s if x[3])
    print(f"| {wl} | {var} | {fmt('before')} | {fmt('after')} | {lim:.2f}x |")
