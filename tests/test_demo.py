"""The web demo: a burst of requests against one loaded model, and the page in a real browser."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from captioner import SHIPPED_FILES
from checkpoints import read_model
from conftest import ROOT, run_script

PHOTOS = [os.path.join(ROOT, 'png', n) for n in ('example.png', 'surfers.jpg', 'skiers.jpg', 'skateboarder.jpg')]
CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.fixture(scope='module')
def sample_captions():
    """What `python sample.py --image PHOTO` prints for each photo (the shipped model)."""
    captions = {}
    for photo in PHOTOS:
        result = run_script('sample.py', '--image', photo)
        assert result.returncode == 0, result.stderr
        captions[os.path.basename(photo)] = result.stdout.strip()
    return captions


def test_burst_of_requests_is_answered_right_by_one_model(tmp_path, sample_captions):
    """50 requests from 8 clients (good photos, a corrupt and a truncated file), an oversized upload
    posted straight to the server: every answer right, the server still serving, one model load."""
    result = run_script('bench/bench_demo.py', '--requests', '50', '--clients', '8', '--json', str(tmp_path / 'r.json'))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / 'r.json'))
    expected = {**sample_captions, 'corrupt.jpg': 'error: corrupt.jpg: not an image Pillow can read',
                'truncated.jpg': 'error: truncated.jpg: broken image (OSError: image file is truncated'}
    answers = report['answers']
    assert len(answers) == 50
    for answer in answers:
        assert answer['answer'].startswith(expected[answer['file']]), answer
    assert report['oversized_status'] == 413 and report['too_many_status'] == 413
    assert report['after'] == sample_captions['example.png']
    assert report['loads'] == 1 and report['uploads_left'] == []
    large = {a['file']: a['answer'] for a in report['large_answers']}  # 8 clients, 16 requests of large PNGs
    assert large['large9400.png'] == 'error: upload_large9400.png: refused: 9400x9400 is over 50 megapixels'
    assert not large['large7000.png'].startswith('error') and len(report['large_answers']) == 16
    assert len({a['answer'] for a in report['large_answers'] if a['file'] == 'large7000.png'}) == 1


@pytest.fixture(scope='module')
def shipped():
    from captioner import Captioner
    return Captioner.load(device='cpu')


def test_uploads_are_deleted_once_read_and_photos_held_for_recaptioning(tmp_path, monkeypatch, shipped,
                                                                         sample_captions):
    """An upload is gone once answered, yet answered again (a queued twin, or the sliders moved);
    an upload stored again at the same path is deleted too; the examples' cached copies stay, and
    an example whose copy Gradio has cleared still works; past the cap the oldest photo is dropped,
    with a message that says so."""
    import demo
    monkeypatch.setattr(demo, 'MAX_HELD', 3)
    page = demo.Demo(shipped, 2 ** 20, upload_dir=tmp_path)
    recorded = shipped.decoding.beam_size, shipped.decoding.length_penalty  # as sample.py decodes
    (tmp_path / 'a1').mkdir()
    upload = str(shutil.copy(PHOTOS[1], tmp_path / 'a1' / 'my_photo.jpg'))  # an example's photo, not its name
    assert page.answer(upload, *recorded)[0] == sample_captions['surfers.jpg']
    assert not os.path.exists(tmp_path / 'a1')
    assert page.answer(upload, *recorded)[0] == sample_captions['surfers.jpg']  # the queued twin
    assert page.answer(upload, 1, 0.0)[0] != 'error'  # the sliders moved: decoded again from what is held
    (tmp_path / 'a1').mkdir()
    shutil.copy(PHOTOS[1], upload)  # the same photo uploaded again: Gradio stores it at the same path
    assert page.answer(upload, *recorded)[0] == sample_captions['surfers.jpg'] and not os.path.exists(upload)
    (tmp_path / 'b2').mkdir()
    corrupt = tmp_path / 'b2' / 'corrupt.jpg'
    corrupt.write_bytes(b'not a photo')
    for _ in range(2):
        assert page.answer(str(corrupt), *recorded)[0] == 'error: corrupt.jpg: not an image Pillow can read'
        assert not corrupt.exists()
    (tmp_path / 'c3').mkdir()
    example = str(shutil.copy(PHOTOS[0], tmp_path / 'c3' / 'example.png'))
    assert page.answer(example, *recorded)[0] == sample_captions['example.png'] and os.path.exists(example)
    (tmp_path / 'd4').mkdir()
    gone = str(tmp_path / 'd4' / 'skiers.jpg')  # Gradio's copy of an example, cleared from its cache
    assert page.answer(gone, *recorded)[0] == sample_captions['skiers.jpg']
    assert list(page.held) == [str(corrupt), example, gone]  # the cap: the surfers upload was dropped first
    assert page.answer(upload, *recorded)[0] == \
        'error: my_photo.jpg: no longer held by the server (it keeps the last 3 photos); upload it again'


def test_a_photo_is_held_at_the_size_the_model_needs(tmp_path, shipped):
    """A 6000x4000 photo is held as the model's input and a copy at most 512 px a side (about 1.4 MB,
    not its 72 MB of pixels); one over the pixel budget is refused before it is decoded."""
    import numpy as np
    from PIL import Image

    import demo
    page = demo.Demo(shipped, 2 ** 24, upload_dir=tmp_path)
    (tmp_path / 'e5').mkdir()
    big = tmp_path / 'e5' / 'big.png'
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (4000, 6000 // 256 + 1))[:, :6000]).save(big)
    inputs, shown = page.read(str(big))
    assert tuple(inputs.shape) == (3, 224, 224) and shown.size == (512, 341)
    assert not big.exists()
    Image.new('L', (9400, 9400)).save(tmp_path / 'huge.png')
    assert page.answer(str(tmp_path / 'huge.png'), 1, 0)[0] == \
        'error: huge.png: refused: 9400x9400 is over 50 megapixels'


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_demo(*flags, temp_dir=None):
    """demo.py on a free port of 127.0.0.1 (its temp files under temp_dir, if given), once it has
    printed its ready line with the page's address: (process, address)."""
    import tempfile
    port = free_port()
    env = {**os.environ, 'GRADIO_TEMP_DIR': str(temp_dir)} if temp_dir else None
    log = tempfile.TemporaryFile('w+')
    server = subprocess.Popen([sys.executable, 'demo.py', '--port', str(port), *flags], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=log)
    address = f'http://127.0.0.1:{port}/'
    deadline = time.time() + 600  # a busy machine may take minutes to import and load
    while True:
        log.seek(0)
        if f'ready: {address}' in log.read():
            return server, address
        assert server.poll() is None and time.time() < deadline, 'demo.py did not start'
        time.sleep(0.5)


@pytest.fixture
def demo_server():
    server, address = start_demo()
    yield address
    server.terminate()
    server.wait(120)


def test_beyond_the_queue_the_answer_is_busy_try_again(sample_captions, tmp_path):
    """With a queue of 1, of 5 simultaneous requests some are answered and the rest told to retry.
    The server keeps its files in a folder of its own, removed when it is stopped."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file
    killed, running = tmp_path / 'demo-uploads-4194304-x1', tmp_path / f'demo-uploads-{os.getpid()}-x2'
    for folder in (killed, running):  # a killed server's leftovers (no process 4194304: above pid_max), a live one's
        folder.mkdir()
        (folder / 'photo.jpg').write_bytes(b'left over')
    server, address = start_demo('--queue_size', '1', temp_dir=tmp_path)
    own = sorted(set(os.listdir(tmp_path)) - {running.name})
    assert len(own) == 1 and own[0].startswith(f'demo-uploads-{server.pid}-'), own
    shutil.rmtree(running)
    recorded = read_model(*SHIPPED_FILES[:2]).decoding

    def one(_):
        client = Client(address, verbose=False, analytics_enabled=False, download_files=False)
        try:  # asked with the shipped model's recorded decoding, as sample.py decodes
            return client.predict(handle_file(PHOTOS[1]), recorded.beam_size, recorded.length_penalty,
                                  api_name='/caption')[0]
        except Exception as e:  # noqa: BLE001 -- the client's error carries the server's message
            return str(e)
    try:
        with ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(one, range(5)))
    finally:
        server.terminate()
        server.wait(120)
    assert set(answers) == {sample_captions['surfers.jpg'], 'Queue is full! Please try again.'}, answers
    assert os.listdir(tmp_path) == []


def greedy_caption(photo):
    result = run_script('sample.py', '--image', photo, '--beam_size', '1')
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_page_in_a_real_browser(demo_server, sample_captions, tmp_path):
    """Headless Chromium: upload a photo, read the caption; a corrupt file, read the message; a
    photo again. No request may leave 127.0.0.1."""
    if CHROMIUM is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('CI: Chromium is not installed (apt-get install chromium)')
        pytest.skip('needs Chromium (Debian package chromium)')
    from playwright.sync_api import sync_playwright
    (tmp_path / 'corrupt.jpg').write_bytes(b'this is not a photo')
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
            '--disable-component-update', '--disable-sync'])
        page = browser.new_page(viewport={'width': 1200, 'height': 1100})
        page.on('request', lambda r: r.url.startswith(demo_server) or r.url.startswith('data:')
                or outside.append(r.url))
        page.goto(demo_server)
        caption = page.locator('#caption textarea')

        def upload(path, expected):
            clear = page.get_by_role('button', name='Clear')
            if clear.count():  # the previous photo
                clear.first.click()
            page.locator('input[type=file]').first.set_input_files(str(path))
            deadline = time.time() + 600  # a busy machine may be several times slower
            while not caption.input_value().startswith(expected):
                assert time.time() < deadline, f'{path}: the page shows {caption.input_value()!r}'
                page.wait_for_timeout(250)
            return caption.input_value()
        def wait_for(expected):
            deadline = time.time() + 600
            while not caption.input_value().startswith(expected):
                assert time.time() < deadline, f'the page shows {caption.input_value()!r}, not {expected!r}'
                page.wait_for_timeout(250)

        assert upload(PHOTOS[1], sample_captions['surfers.jpg']) == sample_captions['surfers.jpg']
        assert page.locator('#shown img').count() == 1  # the photo as read is shown
        assert upload(tmp_path / 'corrupt.jpg', 'error:') == 'error: corrupt.jpg: not an image Pillow can read'
        (tmp_path / 'notes.txt').write_text('not a photo')
        # waits for its own message: the corrupt file's, also an error, is still on the page until it comes
        assert upload(tmp_path / 'notes.txt', 'error: notes.txt') == 'error: notes.txt: not an image Pillow can read'
        assert page.locator('#shown img').count() == 0  # the last photo is not left on screen
        page.get_by_role('button', name='Clear').first.click()
        page.get_by_text('skiers.jpg').first.click()  # an example: captioned at once, as an upload
        wait_for(sample_captions['skiers.jpg'])
        assert upload(PHOTOS[0], sample_captions['example.png']) == sample_captions['example.png']
        page.wait_for_timeout(1500)  # let the attention figure arrive
        heading = page.get_by_text('Where the model looked, word by word').bounding_box()
        figure = page.locator('#attention img').bounding_box()
        assert figure and heading['y'] + heading['height'] <= figure['y']  # nothing covers the figure
        page.screenshot(path=os.environ.get('DEMO_SCREENSHOT', str(tmp_path / 'page.png')), full_page=True)
        slider = page.locator('input[type=range]').first  # beam size 1: re-captioned from what the server holds
        slider.fill('1')
        slider.dispatch_event('pointerup')
        wait_for(greedy_caption(PHOTOS[0]))
        deadline = time.time() + 600
        while page.locator('#beams tbody tr').count() != 1:  # one beam
            assert time.time() < deadline, page.locator('#beams tbody tr').count()
            page.wait_for_timeout(250)
        browser.close()
    assert outside == []


def test_the_demo_listens_on_this_machine_only_and_caps_uploads_by_default(tmp_path, shipped):
    import demo
    args = demo.parse_args([])
    assert (args.host, args.port, args.max_upload_mb, args.queue_size) == ('127.0.0.1', 7860, 10, 16)
    page = demo.Demo(shipped, 2 ** 20, upload_dir=tmp_path)
    (tmp_path / 'f6').mkdir()
    big = tmp_path / 'f6' / 'photo.jpg'
    big.write_bytes(open(PHOTOS[1], 'rb').read() + bytes(2 ** 20))  # a real photo, padded past 1 MB
    assert page.answer(str(big), 1, 0)[0] == 'error: photo.jpg: larger than 1 MB'


def asgi_post(app, body, headers):
    """POST `body` to an ASGI app at /gradio_api/upload: (status, what the app received or None)."""
    import asyncio
    received, sent = [], []

    async def inner(scope, receive, send):
        message = await receive()
        received.append(message['body'])
        await send({'type': 'http.response.start', 'status': 200, 'headers': []})
        await send({'type': 'http.response.body', 'body': b'ok'})

    async def run():
        chunks = [body[:100], body[100:]]

        async def receive():
            chunk = chunks.pop(0) if chunks else b''
            return {'type': 'http.request', 'body': chunk, 'more_body': bool(chunks)}

        async def send(message):
            sent.append(message)
        scope = {'type': 'http', 'method': 'POST', 'path': '/gradio_api/upload', 'headers': headers}
        await app(inner)(scope, receive, send)
    asyncio.run(run())
    return sent[0]['status'], (received[0] if received else None)


def test_upload_requests_are_capped_in_size_and_files_before_anything_is_stored():
    import demo
    limited = lambda inner: demo.UploadLimit(inner, max_bytes=1000)
    boundary = b'XyZ'

    def form(files):
        parts = b''.join(b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="%d.jpg"\r\n\r\n' % i
                         + content + b'\r\n' for i, content in enumerate(files))
        return parts + b'--XyZ--\r\n'

    def headers(body, length=True):
        found = [(b'content-type', b'multipart/form-data; boundary=' + boundary)]
        return found + ([(b'content-length', str(len(body)).encode())] if length else [])
    one = form([b'\xff\xd8' + bytes(300)])
    assert asgi_post(limited, one, headers(one)) == (200, one)  # handed on whole
    big = form([bytes(600), bytes(600)])
    assert asgi_post(limited, big, headers(big)) == (413, None)
    many = form([b'x'] * 5)
    assert asgi_post(limited, many, headers(many)) == (413, None)
    four = form([b'x'] * 4)
    assert asgi_post(limited, four, headers(four))[0] == 200
    assert asgi_post(limited, one, headers(one, length=False)) == (411, None)
