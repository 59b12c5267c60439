"""The web demo under a burst: latency, the server's peak memory, and every answer checked.

Starts demo.py on a free port of 127.0.0.1, sends --requests caption requests from --clients
concurrent clients (the repo's example photos, a corrupt file, a truncated one), then a burst of
large PNGs from the same clients (7000x7000, just under the 50-megapixel budget, and 9400x9400,
over it), and posts an oversized file and a request of too many files straight to the upload
route; then stops the server. Prints latency percentiles, the server's peak resident memory, how
many times it loaded the model, and the uploads still on its disk after answering; --json writes
every answer.

    python bench/bench_demo.py           # 50 requests from 8 clients
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from timing import ROOT, machine
from captioner import Captioner  # a repo module: importable once timing has put the repo on sys.path

PHOTOS = [os.path.join(ROOT, 'png', n) for n in ('example.png', 'surfers.jpg', 'skiers.jpg', 'skateboarder.jpg')]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(port, upload_dir, *flags):
    """demo.py on 127.0.0.1:port keeping uploads in upload_dir, once its page answers (the process
    and its stderr file)."""
    log = tempfile.TemporaryFile('w+')
    server = subprocess.Popen([sys.executable, 'demo.py', '--port', str(port), *flags], cwd=ROOT, stdout=log,
                              stderr=log, env={**os.environ, 'GRADIO_ANALYTICS_ENABLED': 'False',
                                               'GRADIO_TEMP_DIR': upload_dir})
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200:
                return server, log
        except httpx.HTTPError:
            assert server.poll() is None, 'demo.py exited early'
            time.sleep(0.5)
    raise TimeoutError('demo.py did not answer within 180 s')


def peak_memory_mb(pid):
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def burst(port, files, requests, clients, decoding):
    """Send `requests` caption requests (cycling through `files`) from `clients` threads, each with
    `decoding`'s beam size and length penalty: [{'file', 'answer', 'seconds'}] in request order."""
    from gradio_client import Client, handle_file

    def one(i):
        path = files[i % len(files)]
        client = Client(f'http://127.0.0.1:{port}/', verbose=False, analytics_enabled=False, download_files=False)
        start = time.perf_counter()
        caption = client.predict(handle_file(path), decoding.beam_size, decoding.length_penalty,
                                 api_name='/caption')[0]
        name = os.path.basename(path).removeprefix('upload_')
        return {'file': name, 'answer': caption, 'seconds': time.perf_counter() - start}
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(requests)))


def post_oversized(port, megabytes):
    """Post a file over the limit straight to the upload route; returns the HTTP status."""
    data = b'\xff\xd8' + bytes(int(megabytes * 2 ** 20))
    response = httpx.post(f'http://127.0.0.1:{port}/gradio_api/upload', files={'files': ('huge.jpg', data)},
                          timeout=60)
    return response.status_code


def post_many(port, count):
    """Post `count` small files in one upload request; returns the HTTP status."""
    files = [('files', (f'{i}.jpg', b'\xff\xd8' + bytes(1000))) for i in range(count)]
    return httpx.post(f'http://127.0.0.1:{port}/gradio_api/upload', files=files, timeout=60).status_code


def write_large_pngs(folder):
    """A 7000x7000 and a 9400x9400 PNG (a few hundred KB each: stripes compress well)."""
    import numpy as np
    from PIL import Image
    paths = []
    for side in (7000, 9400):
        pixels = np.zeros((side, side, 3), np.uint8)
        pixels[::16] = (200, 120, 40)
        paths.append(os.path.join(folder, f'upload_large{side}.png'))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--requests', type=int, default=50, help='caption requests of the first burst')
    parser.add_argument('--clients', type=int, default=8, help='concurrent clients')
    parser.add_argument('--json', help='write every answer here')
    args = parser.parse_args()
    port = free_port()
    decoding = Captioner.load(device='cpu').decoding  # what the page starts with: the model's own
    with tempfile.TemporaryDirectory() as work:
        corrupt, truncated = os.path.join(work, 'corrupt.jpg'), os.path.join(work, 'truncated.jpg')
        open(corrupt, 'wb').write(b'this is not a photo')
        open(truncated, 'wb').write(open(PHOTOS[1], 'rb').read()[:5000])
        # the photos under other names: the server deletes uploads but keeps its example photos
        photos = [shutil.copy(p, os.path.join(work, 'upload_' + os.path.basename(p))) for p in PHOTOS]
        uploads = os.path.join(work, 'server')  # the server's upload folder
        server, log = start_server(port, uploads, '--max_upload_mb', '2')
        try:
            start = time.perf_counter()
            answers = burst(port, photos + [corrupt, truncated], args.requests, args.clients, decoding)
            wall = time.perf_counter() - start
            oversized = post_oversized(port, 3)
            too_many = post_many(port, 10)
            after = burst(port, photos[:1], 1, 1, decoding)[0]['answer']  # still serving
            memory = peak_memory_mb(server.pid)
            large = write_large_pngs(work)
            start = time.perf_counter()
            large_answers = burst(port, large, 2 * args.clients, args.clients, decoding)
            large_wall = time.perf_counter() - start
            large_memory = peak_memory_mb(server.pid)
            left = sorted(name for _, _, names in os.walk(uploads) for name in names
                          if name.startswith('upload_') or name in ('corrupt.jpg', 'truncated.jpg'))
        finally:
            server.terminate()
            server.wait(30)
        log.seek(0)
        loads = log.read().count('model loaded')
    seconds = sorted(a['seconds'] for a in answers)
    print(f'{machine()}\n{args.requests} requests from {args.clients} clients in {wall:.1f} s '
          f'({args.requests / wall:.2f} requests/s)')
    print(f'  latency: median {statistics.median(seconds):.2f} s, 90th percentile '
          f'{seconds[int(0.9 * (len(seconds) - 1))]:.2f} s, max {seconds[-1]:.2f} s')
    print(f'  server peak memory: {memory:.0f} MB; model loaded {loads} time(s)')
    print(f'  oversized upload (3 MB, limit 2 MB): HTTP {oversized}; 10 files in one request: HTTP {too_many}; '
          f'answered after them: {after!r}')
    print(f'  {len(large_answers)} requests of 7000x7000 and 9400x9400 PNGs from {args.clients} clients in '
          f'{large_wall:.1f} s; server peak memory then {large_memory:.0f} MB')
    for name in sorted({a['file'] for a in large_answers}):
        print(f'    {name}: {next(a["answer"] for a in large_answers if a["file"] == name)!r}')
    print(f'  uploads still on the server after answering: {len(left)}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'answers': answers, 'oversized_status': oversized, 'too_many_status': too_many, 'after': after,
                       'loads': loads, 'uploads_left': left, 'large_answers': large_answers,
                       'peak_memory_mb': memory, 'large_peak_memory_mb': large_memory}, f, indent=1)


if __name__ == '__main__':
    main()
