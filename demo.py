"""A local web page for captioning your own photos (Gradio).

Upload or drop a photo, or click an example: the page shows its caption, the best beams with
their scores, and (for an attention model) where the model looked for each word. It loads the
model sample.py would load with the same flags, once, and reads every upload with the same image
reader, so a photo's caption here is sample.py's.

    python demo.py                # http://127.0.0.1:7860 ; --host 0.0.0.0 to share it on a network

It listens on 127.0.0.1 unless --host says otherwise, sends nothing out (no analytics, no fonts
or scripts from other sites), keeps uploads in a temporary folder of its own (removed when it
stops), deletes each upload once read, refuses uploads over --max_upload_mb (and images over
Pillow's pixel limit), and answers one request at a time from a queue of --queue_size; beyond it
the page says the demo is busy.
"""
import argparse
import atexit
import contextlib
import filecmp
import io
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # before gradio is imported

from dataclasses import replace  # noqa: E402

from captioner import Captioner, add_model_args  # noqa: E402
from errors import InputError  # noqa: E402
from figures import attention_figure  # noqa: E402
from images import open_image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = [os.path.join(HERE, 'png', name) for name in
            ('example.png', 'surfers.jpg', 'skiers.jpg', 'skateboarder.jpg', 'birthday.jpg')]
MAX_BEAMS = 10
HOLD_SECONDS = 60  # how long what a deleted upload held stays in memory after it was last asked for


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
    """What the page calls: one loaded Captioner and the upload limits.

    An upload under `upload_dir` is deleted as soon as it has been read. Gradio stores identical
    uploads as one file, so what was read from it (photo or error) is kept in memory until
    HOLD_SECONDS after it was last asked for, for an identical upload still waiting in the queue.
    """

    def __init__(self, captioner, max_upload_bytes, upload_dir=None):
        self.captioner, self.max_upload_bytes = captioner, max_upload_bytes
        self.upload_dir = upload_dir and os.path.realpath(upload_dir)
        self.recent = {}  # deleted upload's path -> (its PIL image or InputError, when last asked for)
        self.recent_lock = threading.Lock()

    def read(self, path):
        """The uploaded photo, or an InputError naming the problem (never the server's temp path)."""
        if os.path.isfile(path):
            found = self.read_file(path)
            if self.is_upload(path):
                self.delete(path, found)
        else:  # deleted once an identical upload was read (then held for a while), or never there
            with self.recent_lock:
                found, _ = self.recent.get(path, (None, None))
            if found is None:
                found = InputError(f'{os.path.basename(path)}: no longer on the server; upload it again')
            else:
                self.hold(path, found)
        if isinstance(found, InputError):
            raise found
        return found

    def read_file(self, path):
        name = os.path.basename(path)
        try:
            if os.path.getsize(path) > self.max_upload_bytes:
                raise InputError(f'{name}: larger than {self.max_upload_bytes // 2 ** 20} MB')
            return open_image(path)
        except InputError as e:  # name the file as the user knows it, not by the server's temp path
            return InputError(str(e).replace(path, name))

    def is_upload(self, path):
        """Under the upload folder, and not one of the example photos (Gradio's copies of them)."""
        if not self.upload_dir or not os.path.realpath(path).startswith(self.upload_dir + os.sep):
            return False
        return not any(os.path.basename(path) == os.path.basename(example) and filecmp.cmp(path, example, shallow=False)
                       for example in EXAMPLES)

    def delete(self, path, found):
        """Delete an upload (and its folder, when empty), remembering what it held for a while."""
        os.remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))
        self.hold(path, found)

    def hold(self, path, found):
        """Keep what a deleted upload held for HOLD_SECONDS from now (a photo may come back and be
        deleted again meanwhile: each entry goes by its own last use, not by the timer that fires)."""
        with self.recent_lock:
            self.recent[path] = (found, time.monotonic())
        forget = threading.Timer(HOLD_SECONDS, self.forget_old)
        forget.daemon = True
        forget.start()

    def forget_old(self):
        with self.recent_lock:
            now = time.monotonic()
            for path in [path for path, (_, asked) in self.recent.items() if now - asked >= HOLD_SECONDS]:
                del self.recent[path]

    def answer(self, path, beam_size, length_penalty):
        """(caption or one-line message, beams table, attention figure or None) for one upload."""
        if not path:
            return 'Upload a photo, or click an example.', [], None
        try:
            image = self.read(path)
        except InputError as e:
            return f'error: {e}', [], None
        decoding = replace(self.captioner.decoding, beam_size=max(1, min(MAX_BEAMS, int(beam_size))),
                           length_penalty=float(length_penalty))
        beams, caption, weights = self.captioner.describe(image, decoding)
        table = [[text, round(score, 4)] for text, score in beams]
        return caption, table, None if weights is None else figure_image(image, caption, weights)


def build_page(demo):
    import gradio as gr
    decoding = demo.captioner.decoding
    # Demo deletes each upload once read; every minute Gradio also deletes cached files (its copies
    # of the examples, the figures it served) older than a minute.
    with gr.Blocks(title='Show and Tell: caption a photo', analytics_enabled=False,
                   delete_cache=(60, 60)) as page:
        gr.Markdown('# Caption a photo\nUpload or drop a photo, or click an example below.')
        with gr.Row():
            with gr.Column():
                photo = gr.File(label='photo', file_types=['image'], type='filepath')
                beam_size = gr.Slider(1, MAX_BEAMS, value=min(decoding.beam_size, MAX_BEAMS), step=1,
                                      label='beam size')
                length_penalty = gr.Slider(0, 2, value=decoding.length_penalty, step=0.1, label='length penalty')
                button = gr.Button('Caption', variant='primary')
            with gr.Column():
                caption = gr.Textbox(label='caption', elem_id='caption')
                beams = gr.Dataframe(headers=['beam', 'score'], label='best beams', interactive=False,
                                     column_widths=['82%', '18%'], buttons=[])
        figure = gr.Image(label='where the model looked, word by word', type='pil', buttons=['download'])
        gr.Examples(EXAMPLES, inputs=photo)
        inputs, outputs = [photo, beam_size, length_penalty], [caption, beams, figure]
        button.click(demo.answer, inputs, outputs, api_name='caption')
        photo.upload(demo.answer, inputs, outputs, api_visibility='private')
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--host', default='127.0.0.1', help='address to listen on (default: this machine only)')
    parser.add_argument('--port', type=int, default=7860)
    parser.add_argument('--max_upload_mb', type=float, default=10, help='largest upload accepted')
    parser.add_argument('--queue_size', type=int, default=16, help='requests that may wait for the model')
    add_model_args(parser)
    args = parser.parse_args(argv)
    try:
        captioner = Captioner.from_args(args)
    except InputError as e:
        sys.exit(f'error: {e}')
    print(f'model loaded: {captioner.config.cnn} + {captioner.config.decoder}', file=sys.stderr, flush=True)
    # Gradio's upload folder is one per machine unless told otherwise: this server gets its own (under
    # GRADIO_TEMP_DIR, if set), so it never deletes a photo another server on the machine has queued.
    parent = os.environ.get('GRADIO_TEMP_DIR') or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    upload_dir = tempfile.mkdtemp(prefix='demo-uploads-', dir=parent)
    os.environ['GRADIO_TEMP_DIR'] = upload_dir  # before gradio is imported
    atexit.register(shutil.rmtree, upload_dir, ignore_errors=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so a terminated server removes it too
    page = build_page(Demo(captioner, int(args.max_upload_mb * 2 ** 20), upload_dir))
    page.queue(max_size=args.queue_size, default_concurrency_limit=1)
    page.launch(server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 2 ** 20),
                share=False, show_error=False, quiet=True, footer_links=[], ssr_mode=False)


if __name__ == '__main__':
    main()
