"""Your own photos and captions: the CSV / JSON Lines converter, and growing a model's vocabulary
to fine-tune it on new words."""
import json
import os
import subprocess

import pytest
import torch
from PIL import Image

import build_vocab
import prepro_csv
import train
from checkpoints import extend_vocabulary, read_model
from conftest import ROOT, make_scenes, run_script, train_args
from vocabulary import load_vocab

BAD_CSV = '''image,caption
red.jpg,"a red square, on a wall"
red.jpg,"a red
square"
blue.jpg,two blue birds
missing.jpg,a missing photo
green.jpg,
/etc/passwd,an absolute path
../x.jpg,a path outside
blue.jpg,two  blue birds
broken.jpg,a broken photo
yellow.jpg,a yellow taxi
white.jpg,a white wall
,no file
black.jpg,too,many,fields
'''


def photos(folder, colours=('red', 'blue', 'green', 'yellow', 'white', 'black')):
    folder.mkdir(parents=True, exist_ok=True)
    for colour in colours:
        Image.new('RGB', (40, 40), colour).save(folder / f'{colour}.jpg')
    (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
    return folder


def converted(folder):
    return {split: json.load(open(folder / f'captions_{split}.json')) for split in ('train', 'dev', 'test')}


def test_every_bad_row_is_reported_with_its_line_and_left_out(tmp_path, capsys):
    images = photos(tmp_path / 'photos')
    (tmp_path / 'c.csv').write_text(BAD_CSV, encoding='utf-8-sig')  # with a BOM
    assert prepro_csv.main(['--captions', str(tmp_path / 'c.csv'), '--image_dir', str(images), '--output_dir',
                            str(tmp_path / 'out'), '--dev', '1', '--test', '1']) == 0
    out, err = capsys.readouterr()
    skipped = [line.split(': ', 1)[0].rsplit(':', 1)[1] for line in err.splitlines() if line.startswith('skipped')]
    assert skipped == ['6', '7', '8', '9', '10', '11', '14', '15']  # the line each bad record starts on
    for problem in ('missing.jpg: no such file', 'green.jpg: empty caption', '/etc/passwd: an absolute or ".." path',
                    '../x.jpg: an absolute', 'blue.jpg: the same caption again (first on line 5)',
                    'broken.jpg: not an image', ':14: no photo named', ':15: 4 fields for 2 columns'):
        assert problem in err, problem
    assert 'kept 5 rows of 4 photos; left out 8 bad rows' in out
    splits = converted(tmp_path / 'out')
    captions = {im['file_name']: [a['caption'] for a in split['annotations'] if a['image_id'] == im['id']]
                for split in splits.values() for im in split['images']}
    assert captions == {'red.jpg': ['a red square, on a wall', 'a red square'], 'blue.jpg': ['two blue birds'],
                        'yellow.jpg': ['a yellow taxi'], 'white.jpg': ['a white wall']}
    assert [len(splits[s]['images']) for s in ('train', 'dev', 'test')] == [2, 1, 1]


def test_splits_are_reproducible_by_photo_or_taken_from_the_file(tmp_path, capsys):
    names = [f'p{i:02d}.jpg' for i in range(20)]
    images = tmp_path / 'photos'
    images.mkdir()
    for name in names:
        Image.new('RGB', (20, 20), 'gray').save(images / name)
    rows = [{'photo': n, 'text': f'photo number {i} seen {k} times', 'part': 'test' if i < 3 else 'train'}
            for i, n in enumerate(names) for k in range(3)]
    (tmp_path / 'c.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    common = ['--captions', str(tmp_path / 'c.jsonl'), '--image_dir', str(images), '--file_column', 'photo',
              '--caption_column', 'text']
    split_of = lambda folder: {im['file_name']: s for s, d in converted(folder).items() for im in d['images']}
    for run in ('a', 'b'):
        assert prepro_csv.main(common + ['--output_dir', str(tmp_path / run), '--dev', '0.2', '--test', '3']) == 0
    first = split_of(tmp_path / 'a')
    assert first == split_of(tmp_path / 'b') and sorted(first) == names  # each photo in one split, the same twice
    assert sorted(first.values()).count('dev') == 4 and sorted(first.values()).count('test') == 3
    assert prepro_csv.main(common + ['--output_dir', str(tmp_path / 'c'), '--seed', '1']) == 0
    assert split_of(tmp_path / 'c') != first
    assert prepro_csv.main(common + ['--output_dir', str(tmp_path / 'd'), '--split_column', 'part']) == 0
    assert {n for n, s in split_of(tmp_path / 'd').items() if s == 'test'} == set(names[:3])
    assert all(len(d['annotations']) == 3 * len(d['images']) for d in converted(tmp_path / 'd').values())
    with pytest.raises(SystemExit, match="no column 'caption'"):
        prepro_csv.main(['--captions', str(tmp_path / 'c.jsonl'), '--image_dir', str(images), '--output_dir',
                         str(tmp_path / 'e'), '--file_column', 'photo'])


def test_the_converter_and_recipe_flags_are_in_help():
    result = run_script('prepro_csv.py', '--help')
    assert result.returncode == 0
    for flag in ('--captions', '--image_dir', '--file_column', '--caption_column', '--split_column', '--dev', '--test',
                 '--seed'):
        assert flag in result.stdout, flag
    recipe = subprocess.run(['bash', os.path.join(ROOT, 'train_recipe.sh'), '--help'], capture_output=True, text=True)
    assert recipe.returncode == 0 and recipe.stdout.startswith('The whole recipe')
    for variable in ('FINETUNE', 'THRESHOLD', 'EPOCHS', 'SCST_STEPS', 'WORK_DIR', 'OUTPUT_DIR', 'SEED'):
        assert variable in recipe.stdout, variable


def test_a_model_grows_its_vocabulary_for_new_words_and_keeps_the_old_ones(tmp_path):
    """build_vocab.py --extend keeps a vocabulary's ids and appends the new words; train.py
    --init_vocab starts each new word as the model's <unk> and every old word as it was."""
    folder = make_scenes(tmp_path / 'scenes')
    assert train.main(train_args(folder, tmp_path / 'm', '--num_epochs', '1')) == 0
    old = load_vocab(str(folder / 'vocab.pkl'))
    more = tmp_path / 'more.json'
    more.write_text(json.dumps({'images': [{'id': 1, 'file_name': 'red.png'}],
                                'annotations': [{'id': 1, 'image_id': 1, 'caption': 'a crimson square on a wall'}]}))
    build_vocab.main(['--caption_path', str(more), '--vocab_path', str(tmp_path / 'grown.pkl'), '--threshold', '1',
                      '--extend', str(folder / 'vocab.pkl')])
    grown = load_vocab(str(tmp_path / 'grown.pkl'))
    assert [grown.idx2word[i] for i in range(len(old))] == [old.idx2word[i] for i in range(len(old))]
    assert [grown.idx2word[i] for i in range(len(old), len(grown))] == ['crimson']
    paths = str(tmp_path / 'm' / 'encoder-1-2.ckpt'), str(tmp_path / 'm' / 'decoder-1-2.ckpt')
    saved = read_model(*paths)
    extended = extend_vocabulary(saved, paths[1], old, str(folder / 'vocab.pkl'), grown)
    unk = old('<unk>')
    for key in ('embed.weight', 'linear.weight', 'linear.bias'):
        before, after = saved.decoder_state[key], extended.decoder_state[key]
        assert after.shape[0] == len(grown) and torch.equal(after[:len(old)], before)
        assert torch.equal(after[-1], before[unk])  # one word added: its bias lowered by log 1 = 0
    assert extended.config.vocab_size == len(grown)
    trainer = train.Trainer(train.parse_args(train_args(folder, tmp_path / 'fine', '--vocab_path',
                                                        str(tmp_path / 'grown.pkl'), '--init_from', paths[1],
                                                        '--init_vocab', str(folder / 'vocab.pkl'))))
    assert torch.equal(trainer.decoder.embed.weight[:len(old)], saved.decoder_state['embed.weight'])
    assert trainer.train() == 0
    build_vocab.main(['--caption_path', str(more), '--vocab_path', str(tmp_path / 'fresh.pkl'), '--threshold', '1'])
    with pytest.raises(SystemExit, match='does not begin with its words'):  # a vocabulary built afresh
        train.main(train_args(folder, tmp_path / 'bad', '--vocab_path', str(tmp_path / 'fresh.pkl'), '--init_from',
                              paths[1], '--init_vocab', str(folder / 'vocab.pkl')))


def test_a_csv_without_a_header_is_told_to_add_one(tmp_path):
    images = tmp_path / 'photos'
    images.mkdir()
    Image.new('RGB', (8, 8)).save(images / 'a.jpg')
    (tmp_path / 'bare.csv').write_text('a.jpg,a dog runs\na.jpg,a dog plays\n')
    with pytest.raises(SystemExit) as refused:
        prepro_csv.main(['--captions', str(tmp_path / 'bare.csv'), '--image_dir', str(images),
                         '--output_dir', str(tmp_path / 'out')])
    assert str(refused.value) == (f'error: {tmp_path / "bare.csv"}: no header row (its first line names a photo): '
                                  f'add the line "file,caption" above the first row')


def test_collections_are_merged_under_one_image_folder_with_their_listed_photos(tmp_path):
    import prepro_merge
    from caption_files import read_captions
    from conftest import TEST_DATA
    captions = os.path.join(TEST_DATA, 'captions.json')
    images = os.path.join(TEST_DATA, 'images')
    (tmp_path / 'ids.json').write_text(json.dumps({'second': [790, 5802]}))
    prepro_merge.main(['--output_dir', str(tmp_path / 'm'), '--ids', str(tmp_path / 'ids.json'),
                       '--set', 'first', 'train', captions, images, '--set', 'second', 'train', captions, images,
                       '--set', 'held', 'dev', captions, images])
    annotations, merged = read_captions(str(tmp_path / 'm' / 'captions_train.json'))
    whole = json.load(open(captions))
    assert len(merged) == len(whole['images']) + 2 and sorted(merged) == list(range(1, len(merged) + 1))
    assert sorted(n for n in merged.values() if n.startswith('second/')) == ['second/000000000790.jpg',
                                                                              'second/000000005802.jpg']
    assert len(annotations) == len(whole['annotations']) + sum(a['image_id'] in (790, 5802) for a in whole['annotations'])
    assert all(os.path.isfile(tmp_path / 'm' / 'images' / name) for name in merged.values())  # one --image_dir
    dev = json.load(open(tmp_path / 'm' / 'captions_dev_held.json'))
    assert dev == json.load(open(tmp_path / 'm' / 'captions_dev.json')) and dev['images'][0]['set'] == 'held'
    (tmp_path / 'ids.json').write_text(json.dumps({'second': [790, 424242]}))
    with pytest.raises(SystemExit, match=r'captions.json: lacks 1 of the 2 images listed for second \(first: 424242\)'):
        prepro_merge.main(['--output_dir', str(tmp_path / 'n'), '--ids', str(tmp_path / 'ids.json'),
                           '--set', 'second', 'train', captions, images])
