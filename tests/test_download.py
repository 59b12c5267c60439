"""download.sh against a local stand-in for the COCO server (tests never download)."""
import hashlib
import os
import subprocess
import zipfile

from conftest import ROOT


def fake_archive(folder, name, members):
    path = folder / name
    with zipfile.ZipFile(path, 'w') as z:
        for member, text in members.items():
            z.writestr(member, text)
    return hashlib.md5(path.read_bytes()).hexdigest()


def run_download(tmp_path, server, **md5):
    env = {**os.environ, 'DATA_DIR': str(tmp_path / 'data'), 'COCO_URL': server,
           **{k.upper() + '_MD5': v for k, v in md5.items()}}
    return subprocess.run(['bash', os.path.join(ROOT, 'download.sh')], capture_output=True, text=True, env=env)


def test_download_resumes_checks_unpacks_and_skips(tmp_path):
    server = tmp_path / 'server'
    (server / 'zips').mkdir(parents=True)
    (server / 'annotations').mkdir()
    md5 = {'train': fake_archive(server / 'zips', 'train2014.zip', {'train2014/a.jpg': 'A' * 5000}),
           'val': fake_archive(server / 'zips', 'val2014.zip', {'val2014/b.jpg': 'B'}),
           'annotations': fake_archive(server / 'annotations', 'annotations_trainval2014.zip',
                                       {'annotations/captions_train2014.json': '{}'})}
    data = tmp_path / 'data'
    data.mkdir()
    whole = (server / 'zips' / 'train2014.zip').read_bytes()
    (data / 'train2014.zip.part').write_bytes(whole[:1000])  # an interrupted download
    result = run_download(tmp_path, f'file://{server}', **md5)
    assert result.returncode == 0, result.stderr
    assert (data / 'train2014' / 'a.jpg').read_text() == 'A' * 5000
    assert (data / 'val2014' / 'b.jpg').exists() and (data / 'annotations' / 'captions_train2014.json').exists()
    assert not list(data.glob('*.zip')) and not list(data.glob('*.part'))
    result = run_download(tmp_path, 'http://127.0.0.1:9', **md5)  # everything done: no network needed
    assert result.returncode == 0 and result.stdout.count('skipping') == 3


def test_download_refuses_a_corrupt_archive(tmp_path):
    server = tmp_path / 'server'
    (server / 'zips').mkdir(parents=True)
    fake_archive(server / 'zips', 'train2014.zip', {'train2014/a.jpg': 'A'})
    result = run_download(tmp_path, f'file://{server}', train='0' * 32)
    assert result.returncode == 1 and 'train2014.zip is corrupt' in result.stderr
    assert not (tmp_path / 'data' / 'train2014').exists() and not list((tmp_path / 'data').glob('*.zip*'))


def test_download_without_network_says_so(tmp_path):
    result = run_download(tmp_path, 'http://127.0.0.1:9')
    assert result.returncode == 1
    assert 'error: could not download http://127.0.0.1:9/zips/train2014.zip (no network' in result.stderr
