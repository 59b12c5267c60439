"""A local web page for captioning your own photos (Gradio).

Upload or drop a photo, or click an example: the page shows its caption, the best beams with
their scores, and (for an attention model) where the model looked for each word. It loads the
model sample.py would load with the same flags, once, and reads every upload with the same image
reader, so a photo's caption here is sample.py's.

    python demo.py                # http://127.0.0.1:7860 ; --host 0.0.0.0 to share it on a network

It listens on 127.0.0.1 unless --host says otherwise and prints `ready: URL` once it serves,
sends nothing out (no analytics, no fonts or scripts from other sites), keeps uploads in a
temporary folder of its own (removed when it stops, or by the next start if it was killed),
deletes each upload once read, refuses a request over --max_upload_mb or with more than 4 files
(and images over 50 megapixels), keeps in memory what the model needs
of the last 32 photos (so the sliders re-caption them), and answers one request at a time from a
queue of --queue_size; beyond it the page says the demo is busy.
"""
import atexit
import collections
import contextlib
import filecmp
import io
import os
import re
import shutil
import signal
import sys
import tempfile
import threading

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # before gradio is imported

from dataclasses import replace  # noqa: E402

from captioner import Captioner, add_model_args  # noqa: E402
from errors import InputError, integer, number, script_parser  # noqa: E402
from figures import attention_figure  # noqa: E402
from files import process_alive  # noqa: E402
from images import open_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = [os.path.join(HERE, 'png', name) for name in
            ('example.png', 'surfers.jpg', 'skiers.jpg', 'skateboarder.jpg', 'birthday.jpg')]
MAX_BEAMS = 10
MAX_HELD = 32  # photos kept in memory for re-captioning (the least recently asked for dropped first)
DISPLAY_SIDE = 512  # the photo shown and drawn under the attention: at most this many pixels a side
MAX_FILES = 4  # files in one upload request (the page sends one)


def figure_image(image, caption, weights):
    """The attention figure as a PIL image."""
    import matplotlib.pyplot as plt
    from PIL import Image
    figure = attention_figure(image, caption.split(), weights)
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=80)
    plt.close(figure)
    return Image.open(buffer)


class Demo:
    """What the page calls: one loaded Captioner, the photos held for re-captioning, the upload limits.

    A photo is read once: its upload under `upload_dir` is deleted as soon as it has been read, and
    what is kept is what the model and the page need, whatever the photo's size: the model's input
    tensor and a copy at most DISPLAY_SIDE pixels a side (or the error it gave). At most MAX_HELD
    photos are held, by path, the least recently asked for dropped first, so the sliders re-caption
    a photo (and a queued identical upload, which Gradio stores as the same file, is answered) for
    as long as the page is in use. The example photos are read from png/ whenever Gradio's copy of
    one is gone (its cache is cleared every minute), so they work as long as the server runs.
    """

    def __init__(self, captioner, max_upload_bytes, upload_dir=None):
        self.captioner, self.max_upload_bytes = captioner, max_upload_bytes
        self.upload_dir = upload_dir and os.path.realpath(upload_dir)
        self.held = collections.OrderedDict()  # path -> (input tensor, display image) or InputError
        self.uploads = set()  # paths read as users' uploads (not examples): never mistaken for an example
        self.lock = threading.Lock()

    def read(self, path):
        """(the model's input, the photo to show) of an upload or example, or an InputError naming the
        problem (never the server's temp path)."""
        with self.lock:
            found = self.held.get(path)
            if found is not None:
                self.held.move_to_end(path)
        if found is None:
            example = self.example_for(path)
            if os.path.isfile(path):
                found = self.read_file(path)
                if self.is_upload(path):
                    self.delete(path)
            elif example:
                found = self.read_file(example)
            else:
                found = InputError(f'{os.path.basename(path)}: no longer held by the server (it keeps the last '
                                   f'{MAX_HELD} photos); upload it again')
            self.hold(path, found)
        elif os.path.isfile(path) and self.is_upload(path):  # uploaded again: Gradio stored it at the same path
            self.delete(path)
        if isinstance(found, InputError):
            raise found
        return found

    def read_file(self, path):
        name = os.path.basename(path)
        try:
            if os.path.getsize(path) > self.max_upload_bytes:
                raise InputError(f'{name}: larger than {self.max_upload_bytes / 2 ** 20:g} MB')
            image = open_image(path)
        except InputError as e:  # name the file as the user knows it, not by the server's temp path
            return InputError(str(e).replace(path, name))
        inputs = self.captioner.transform(image)
        image.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE))
        return inputs, image

    def example_for(self, path):
        """The example photo that `path` is Gradio's copy of (by its name; never a user's upload), or None."""
        if path in self.uploads:
            return None
        return next((example for example in EXAMPLES if os.path.basename(example) == os.path.basename(path)), None)

    def is_upload(self, path):
        """Under the upload folder, and not one of the example photos (Gradio's copies of them)."""
        if not self.upload_dir or not os.path.realpath(path).startswith(self.upload_dir + os.sep):
            return False
        example = self.example_for(path)
        if example and filecmp.cmp(path, example, shallow=False):
            return False
        with self.lock:
            if len(self.uploads) >= 100 * MAX_HELD:  # paths only, but not without bound
                self.uploads.clear()
            self.uploads.add(path)
        return True

    def delete(self, path):
        """Delete an upload, and its folder when empty."""
        os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))

    def hold(self, path, found):
        with self.lock:
            self.held[path] = found
            self.held.move_to_end(path)
            while len(self.held) > MAX_HELD:
                self.held.popitem(last=False)

    def answer(self, path, beam_size, length_penalty):
        """(caption or one-line message, beams table, attention figure or None, photo shown or None)."""
        if not path:
            return 'Upload a photo, or click an example.', [], None, None
        try:
            inputs, image = self.read(path)
        except InputError as e:
            return f'error: {e}', [], None, None
        decoding = replace(self.captioner.decoding, beam_size=max(1, min(MAX_BEAMS, int(beam_size))),
                           length_penalty=float(length_penalty))
        found = self.captioner.describe(inputs, decoding)
        table = [[text, round(score, 4)] for text, score in found.beams]
        figure = None if found.weights is None else figure_image(image, found.caption, found.weights)
        return found.caption, table, figure, image


class UploadLimit:
    """ASGI middleware: an upload request is refused (HTTP 413) before anything of it is stored when
    its body is over `max_bytes` in all or holds more than MAX_FILES files; one without a
    Content-Length (a chunked body, which the page never sends) is refused with 411."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope['type'] != 'http' or scope['method'] != 'POST' or not scope['path'].endswith('/upload'):
            return await self.app(scope, receive, send)
        headers = dict(scope['headers'])
        length = headers.get(b'content-length', b'')
        if not length.isdigit():
            return await self.refuse(send, 411, 'an upload needs a Content-Length')
        if int(length) > self.max_bytes:
            return await self.refuse(send, 413, f'upload over the maximum allowed size of {self.max_bytes} bytes')
        body, more = b'', True
        while more:  # at most max_bytes, then handed on whole
            message = await receive()
            body += message.get('body', b'')
            more = message.get('more_body', False) and message['type'] == 'http.request'
        boundary = headers.get(b'content-type', b'').partition(b'boundary=')[2].strip(b'"')
        if boundary and body.count(b'--' + boundary) - 1 > MAX_FILES:
            return await self.refuse(send, 413, f'more than {MAX_FILES} files in one upload')
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {'type': 'http.request', 'body': body, 'more_body': False}
        return await self.app(scope, replay, send)

    @staticmethod
    async def refuse(send, status, text):
        await send({'type': 'http.response.start', 'status': status,
                    'headers': [(b'content-type', b'text/plain; charset=utf-8')]})
        await send({'type': 'http.response.body', 'body': text.encode()})


def build_page(demo):
    import gradio as gr
    decoding = demo.captioner.decoding
    # Demo deletes each upload once read; every minute Gradio also deletes cached files (its copies
    # of the examples, the figures it served) older than a minute.
    with gr.Blocks(title='Show and Tell: caption a photo', analytics_enabled=False,
                   delete_cache=(60, 60)) as page:
        gr.Markdown('# Caption a photo\nUpload or drop a photo, or click an example below. The model was trained '
                    'on Flickr8k: it knows people, dogs and outdoor scenes, and little else.')
        with gr.Row():
            with gr.Column():
                photo = gr.File(label='photo', type='filepath')  # any file: one that is no image gets a message
                beam_size = gr.Slider(1, MAX_BEAMS, value=min(decoding.beam_size, MAX_BEAMS), step=1,
                                      label='beam size')
                length_penalty = gr.Slider(0, 2, value=decoding.length_penalty, step=0.1, label='length penalty')
                button = gr.Button('Caption', variant='primary')
            with gr.Column():
                caption = gr.Textbox(label='caption', elem_id='caption')
                shown = gr.Image(label='the photo', type='pil', height=260, elem_id='shown', buttons=[])
                beams = gr.Dataframe(headers=['beam', 'score'], interactive=False,
                                     label='best beams (score: log-probability / length ** length penalty; '
                                           'nearer 0 is likelier)',
                                     column_widths=['82%', '18%'], buttons=[], elem_id='beams')
        gr.Markdown('### Where the model looked, word by word')
        figure = gr.Image(show_label=False, type='pil', buttons=['download'], elem_id='attention')
        gr.Examples(EXAMPLES, inputs=photo)
        inputs, outputs = [photo, beam_size, length_penalty], [caption, beams, figure, shown]
        button.click(demo.answer, inputs, outputs, api_name='caption')
        # An upload, an example clicked and a changed setting (dragged, or typed and Enter) all re-caption.
        photo.change(demo.answer, inputs, outputs, api_visibility='private')
        for slider in (beam_size, length_penalty):
            slider.change(demo.answer, inputs, outputs, api_visibility='private', trigger_mode='always_last')
    return page


def remove_leftovers(parent):
    """Remove the upload folders of demo servers that were killed (their process is gone)."""
    for name in os.listdir(parent):
        match = re.fullmatch(r'demo-uploads-(\d+)-.*', name)
        if match and not process_alive(int(match[1])):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def parse_args(argv=None):
    parser = script_parser(__doc__)
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every network it is on')
    parser.add_argument('--port', type=integer(1, 65535), default=7860, help='port to listen on')
    parser.add_argument('--max_upload_mb', type=number(above=0, high=1024), default=10,
                        help='largest request accepted (one photo, or a few)')
    parser.add_argument('--queue_size', type=integer(1, 1000), default=16, help='requests that may wait for the model')
    add_model_args(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        captioner = Captioner.from_args(args)
    except InputError as e:
        sys.exit(f'error: {e}')
    print(f'model loaded: {captioner.config.cnn} + {captioner.config.decoder}', file=sys.stderr, flush=True)
    # Gradio's upload folder is one per machine unless told otherwise: this server gets its own (under
    # GRADIO_TEMP_DIR, if set), so it never deletes a photo another server on the machine has queued.
    parent = os.environ.get('GRADIO_TEMP_DIR') or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(parent)
    upload_dir = tempfile.mkdtemp(prefix=f'demo-uploads-{os.getpid()}-', dir=parent)
    os.environ['GRADIO_TEMP_DIR'] = upload_dir  # before gradio is imported
    atexit.register(shutil.rmtree, upload_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a terminated server removes it too
    page = build_page(Demo(captioner, int(args.max_upload_mb * 2 ** 20), upload_dir))
    page.queue(max_size=args.queue_size, default_concurrency_limit=1)
    from starlette.middleware import Middleware
    max_bytes = int(args.max_upload_mb * 2 ** 20)
    _, address, _ = page.launch(server_name=args.host, server_port=args.port, max_file_size=max_bytes, share=False,
                                show_error=False, quiet=True, footer_links=[], ssr_mode=False, prevent_thread_lock=True,
                                app_kwargs={'middleware': [Middleware(UploadLimit, max_bytes=max_bytes + 2 ** 16)]})
    print(f'ready: {address}', file=sys.stderr, flush=True)
    page.block_thread()


if __name__ == '__main__':
    main()
