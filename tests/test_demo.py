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
    assert report['oversized_status'] == 413 and report['after'] == sample_captions['example.png']
    assert report['loads'] == 1 and report['uploads_left'] == []


def test_uploads_are_deleted_once_read(tmp_path, monkeypatch, sample_captions):
    """An upload is gone once answered; an identical upload still queued (Gradio stores it as the
    same file) gets the same answer; the examples' cached copies stay; nothing is held for long."""
    import demo
    from captioner import Captioner
    monkeypatch.setattr(demo, 'HOLD_SECONDS', 5)
    page = demo.Demo(Captioner.load(device='cpu'), 2 ** 20, upload_dir=tmp_path)
    recorded = page.captioner.decoding.beam_size, page.captioner.decoding.length_penalty  # as sample.py decodes
    (tmp_path / 'a1').mkdir()
    upload = str(shutil.copy(PHOTOS[1], tmp_path / 'a1' / 'my_photo.jpg'))  # an example's photo, not its name
    assert page.answer(upload, *recorded)[0] == sample_captions['surfers.jpg']
    assert not os.path.exists(tmp_path / 'a1')
    assert page.answer(upload, *recorded)[0] == sample_captions['surfers.jpg']  # the queued twin
    (tmp_path / 'b2').mkdir()
    corrupt = tmp_path / 'b2' / 'corrupt.jpg'
    corrupt.write_bytes(b'not a photo')
    for _ in range(2):
        assert page.answer(str(corrupt), *recorded)[0] == 'error: corrupt.jpg: not an image Pillow can read'
        assert not corrupt.exists()
    (tmp_path / 'c3').mkdir()
    example = str(shutil.copy(PHOTOS[0], tmp_path / 'c3' / 'example.png'))
    assert page.answer(example, *recorded)[0] == sample_captions['example.png'] and os.path.exists(example)
    time.sleep(5.5)
    assert page.recent == {}
    assert page.answer(upload, *recorded)[0] == 'error: my_photo.jpg: no longer on the server; upload it again'


def test_a_queued_twin_outlives_an_earlier_deletion_of_its_photo(tmp_path, monkeypatch):
    """The same photo uploaded, read, uploaded again and read again: a twin still queued after the
    first hold ran out is answered, since the photo was held afresh; held until unasked for long."""
    import demo
    from errors import InputError
    monkeypatch.setattr(demo, 'HOLD_SECONDS', 2)
    page = demo.Demo(captioner=None, max_upload_bytes=2 ** 20, upload_dir=tmp_path)
    (tmp_path / 'a1').mkdir()
    upload = str(tmp_path / 'a1' / 'my_photo.jpg')
    size = page.read(shutil.copy(PHOTOS[1], upload)).size
    time.sleep(1.2)
    (tmp_path / 'a1').mkdir()
    assert page.read(shutil.copy(PHOTOS[1], upload)).size == size  # the photo came back
    time.sleep(1.2)  # the first hold has run out, the second has not
    assert page.read(upload).size == size
    time.sleep(2.3)  # asked for last 2.3 s ago
    assert page.recent == {}
    with pytest.raises(InputError, match='my_photo.jpg: no longer on the server; upload it again'):
        page.read(upload)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_demo(*flags, temp_dir=None):
    """demo.py on a free port of 127.0.0.1 (its temp files under temp_dir, if given), once its page
    answers: (process, address)."""
    port = free_port()
    env = {**os.environ, 'GRADIO_TEMP_DIR': str(temp_dir)} if temp_dir else None
    server = subprocess.Popen([sys.executable, 'demo.py', '--port', str(port), *flags], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f'http://127.0.0.1:{port}/', timeout=2).status_code == 200:
                return server, f'http://127.0.0.1:{port}/'
        except httpx.HTTPError:
            assert server.poll() is None and time.time() < deadline, 'demo.py did not start'
            time.sleep(0.5)


@pytest.fixture
def demo_server():
    server, address = start_demo()
    yield address
    server.terminate()
    server.wait(30)


def test_beyond_the_queue_the_answer_is_busy_try_again(sample_captions, tmp_path):
    """With a queue of 1, of 5 simultaneous requests some are answered and the rest told to retry.
    The server keeps its files in a folder of its own, removed when it is stopped."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file
    server, address = start_demo('--queue_size', '1', temp_dir=tmp_path)
    own = os.listdir(tmp_path)
    assert len(own) == 1 and own[0].startswith('demo-uploads-'), own
    recorded = read_model(*SHIPPED_FILES[:2], classic_config=None)[1]

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
        server.wait(30)
    assert set(answers) == {sample_captions['surfers.jpg'], 'Queue is full! Please try again.'}, answers
    assert os.listdir(tmp_path) == []


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
            deadline = time.time() + 120
            while not caption.input_value().startswith(expected):
                assert time.time() < deadline, f'{path}: the page shows {caption.input_value()!r}'
                page.wait_for_timeout(250)
            return caption.input_value()
        assert upload(PHOTOS[1], sample_captions['surfers.jpg']) == sample_captions['surfers.jpg']
        assert upload(tmp_path / 'corrupt.jpg', 'error:') == 'error: corrupt.jpg: not an image Pillow can read'
        assert upload(PHOTOS[0], sample_captions['example.png']) == sample_captions['example.png']
        page.wait_for_timeout(1500)  # let the attention figure arrive
        page.screenshot(path=os.environ.get('DEMO_SCREENSHOT', str(tmp_path / 'page.png')), full_page=True)
        browser.close()
    assert outside == []
