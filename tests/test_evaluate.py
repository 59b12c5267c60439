import json
import os
import shutil

import pytest

import evaluate
import extract_features
import metrics
import prepro_flickr8k
import prepro_karpathy
import train
from captioner import Captioner
from conftest import TEST_DATA, shared_path

needs_java = pytest.mark.skipif(shutil.which('java') is None, reason='the PTB tokenizer and METEOR need Java')


def predictions_for(caption_path):
    """Plausible predictions: for each image, a shuffled-word version of one of its references."""
    data = json.load(open(caption_path))
    predictions = {}
    for i, ann in enumerate(data['annotations']):
        if ann['image_id'] not in predictions:
            words = ann['caption'].split()
            predictions[ann['image_id']] = ' '.join(words[i % 3:] + words[:i % 3])
    return predictions


@needs_java
def test_scores_equal_pycocoevalcaps_own_evaluation(tmp_path, monkeypatch, capsys):
    """Our numbers must be what COCOEvalCap computes from the same results file."""
    from pycocotools.coco import COCO
    import pycocoevalcap.eval as official
    caption_path = os.path.join(TEST_DATA, 'captions.json')
    predictions = predictions_for(caption_path)
    results = [{'image_id': i, 'caption': c} for i, c in predictions.items()]
    (tmp_path / 'results.json').write_text(json.dumps(results))
    evaluate.main(['--caption_path', caption_path, '--results', str(tmp_path / 'results.json'),
                   '--scores', str(tmp_path / 'scores.json')])
    ours = json.load(open(tmp_path / 'scores.json'))
    table = capsys.readouterr().out
    assert f'({len(results)} images)' in table and 'CIDEr' in table

    class NoSpice:  # SPICE downloads models on first use, which fails offline
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return 'SPICE'
    monkeypatch.setattr(official, 'Spice', NoSpice)
    coco = COCO(caption_path)
    evaluation = official.COCOEvalCap(coco, coco.loadRes(str(tmp_path / 'results.json')))
    evaluation.evaluate()
    assert set(ours) == {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'}
    for metric, value in ours.items():
        assert value == pytest.approx(evaluation.eval[metric], abs=1e-9), metric
    assert 0 < ours['Bleu_4'] < ours['Bleu_1'] < 1


def test_results_for_unknown_images_are_refused(tmp_path):
    caption_path = os.path.join(TEST_DATA, 'captions.json')
    (tmp_path / 'results.json').write_text(json.dumps([{'image_id': 123456789, 'caption': 'a cat'}]))
    with pytest.raises(SystemExit, match=r'results.json: \[0\] image_id 123456789 is not in the annotations'):
        evaluate.main(['--caption_path', caption_path, '--results', str(tmp_path / 'results.json'),
                       '--scores', str(tmp_path / 'scores.json')])
    (tmp_path / 'results.json').write_text(json.dumps({'image_id': 1}))
    with pytest.raises(SystemExit, match='not a COCO results file'):
        evaluate.main(['--caption_path', caption_path, '--results', str(tmp_path / 'results.json')])
    assert not (tmp_path / 'scores.json').exists()


def test_without_java_says_which_metrics_it_skipped(monkeypatch, capsys):
    monkeypatch.setattr(metrics.shutil, 'which', lambda name: None)
    references = {1: ['A man riding a horse.', 'a person on a horse'], 2: ['Two dogs play in the grass']}
    scores = metrics.score(references, {1: 'a man rides a horse', 2: 'a dog in the grass'})
    assert set(scores) == {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'ROUGE_L', 'CIDEr'}
    assert 'METEOR and SPICE skipped' in capsys.readouterr().err


@needs_java
def test_caption_and_score_a_split_with_a_model(tiny_model, tmp_path, capsys):
    caption_path = os.path.join(TEST_DATA, 'captions.json')
    flags = ['--caption_path', caption_path, '--image_dir', os.path.join(TEST_DATA, 'images'),
             '--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
             '--vocab_path', tiny_model['vocab'], '--num_workers', '0', '--device', 'cpu',
             '--allow_holes', '--no_repeat', '0']  # guarded, this tiny model says "a man" at any beam size
    scores, captions = {}, {}
    images = {i['id']: i['file_name'] for i in json.load(open(caption_path))['images']}
    for beam in (1, 3):
        out = tmp_path / f'beam{beam}'
        evaluate.main(flags + ['--beam_size', str(beam), '--output', f'{out}.json', '--scores', f'{out}-scores.json'])
        results = json.load(open(f'{out}.json'))
        assert len(results) == 12 and all(set(r) == {'image_id', 'file_name', 'caption'} for r in results)
        captioner = Captioner.load(tiny_model['encoder'], tiny_model['decoder'], tiny_model['vocab'], 'cpu',
                                   beam_size=beam, allow_holes=True, no_repeat=0)
        captions[beam] = {r['image_id']: r['caption'] for r in results}
        assert captions[beam] == {i: captioner.caption(os.path.join(TEST_DATA, 'images', images[i])) for i in images}
        scores[beam] = json.load(open(f'{out}-scores.json'))
    assert 'scoring 12 images' in capsys.readouterr().err
    assert captions[1] != captions[3] and scores[1] != scores[3]  # the beam size reached the search


def test_captions_from_a_feature_cache_match_those_from_the_images(tmp_path):
    """--features runs only the decoder on the cache; the captions are the images' own (the shipped
    model, whose captions differ from photo to photo)."""
    caption_path, image_dir = os.path.join(TEST_DATA, 'captions.json'), os.path.join(TEST_DATA, 'images')
    model = ['--device', 'cpu', '--beam_size', '2']
    for size in (224, 240):  # the shipped model reads 224x224 images (Lite1's own size is 240)
        extract_features.main(['--image_dir', image_dir, '--caption_path', caption_path, '--cnn', 'efficientnet-lite1',
                               '--image_size', str(size), '--output_dir', str(tmp_path / f'cache{size}'),
                               '--num_workers', '0', '--device', 'cpu', '--spatial'])
    runs = {}
    for name, source in (('images', ['--image_dir', image_dir, '--num_workers', '0']),
                         ('cache', ['--features', str(tmp_path / 'cache224')])):
        evaluate.main(['--caption_path', caption_path, *source, *model, '--output', str(tmp_path / f'{name}.json'),
                       '--scores', str(tmp_path / f'{name}-scores.json')])
        runs[name] = sorted((r['image_id'], r['caption']) for r in json.load(open(tmp_path / f'{name}.json')))
    assert len(runs['cache']) == 12 and runs['cache'] == runs['images']
    assert len({caption for _, caption in runs['images']}) > 6  # not one caption for every photo
    with pytest.raises(SystemExit, match='cache240: cached at input size 240 .* the model reads 224'):
        evaluate.main(['--caption_path', caption_path, '--features', str(tmp_path / 'cache240'), *model,
                       '--output', str(tmp_path / 'wrong.json')])
    assert not (tmp_path / 'wrong.json').exists()


def test_prepro_flickr8k_writes_coco_splits(tmp_path):
    data = tmp_path / 'flickr'
    data.mkdir()
    lines = ['b.jpg#0\tA dog runs .', 'b.jpg#1\tA brown dog .', 'a.jpg#0\tTwo kids play .', 'c.jpg#0\tA cat .']
    (data / 'Flickr8k.token.txt').write_bytes('\r\n'.join(lines).encode() + b'\r\n')
    (data / 'Flickr_8k.trainImages.txt').write_bytes(b'a.jpg\r\nb.jpg\r\nmissing.jpg\r\n')
    (data / 'Flickr_8k.devImages.txt').write_text('c.jpg\n')
    prepro_flickr8k.main(['--data_dir', str(data), '--output_dir', str(tmp_path / 'out')])
    train_split = json.load(open(tmp_path / 'out' / 'captions_train.json'))
    assert train_split['images'] == [{'id': 2, 'file_name': 'a.jpg'}, {'id': 1, 'file_name': 'b.jpg'}]
    assert [(a['image_id'], a['caption']) for a in train_split['annotations']] == [
        (2, 'Two kids play .'), (1, 'A dog runs .'), (1, 'A brown dog .')]
    dev = json.load(open(tmp_path / 'out' / 'captions_dev.json'))
    assert dev['images'] == [{'id': 3, 'file_name': 'c.jpg'}]
    assert not (tmp_path / 'out' / 'captions_test.json').exists()
    (data / 'Flickr8k.token.txt').write_text('no tab here\n')
    with pytest.raises(SystemExit, match=r'Flickr8k.token.txt:1: expected'):
        prepro_flickr8k.main(['--data_dir', str(data), '--output_dir', str(tmp_path / 'out')])


def test_prepro_flickr8k_on_the_real_files(tmp_path):
    data = shared_path('data', 'flickr8k')
    prepro_flickr8k.main(['--data_dir', data, '--output_dir', str(tmp_path)])
    train_split = json.load(open(tmp_path / 'captions_train.json'))
    dev = json.load(open(tmp_path / 'captions_dev.json'))
    assert len(train_split['images']) == 5997 and len(train_split['annotations']) == 5 * 5997
    assert len(dev['images']) == 1000 and len(dev['annotations']) == 5000
    assert not any(a['caption'].endswith('\r') for a in dev['annotations'])
    assert not {i['id'] for i in train_split['images']} & {i['id'] for i in dev['images']}


def test_karpathy_split_round_trips_into_training_and_evaluation(tmp_path, coco_sample):
    """A dataset_coco.json-style file -> COCO caption files -> train.py with validation -> evaluate.py."""
    root = tmp_path / 'coco'
    names = sorted(os.listdir(coco_sample['images']))
    captions = json.load(open(coco_sample['captions']))
    by_name = {im['file_name']: im['id'] for im in captions['images']}
    images = []
    for i, name in enumerate(names):
        folder = 'val2014' if i < 4 else 'train2014'
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(coco_sample['images'], name), root / folder / name)
        sentences = [{'raw': a['caption'], 'tokens': []} for a in captions['annotations']
                     if a['image_id'] == by_name[name]]
        images.append({'filepath': folder, 'filename': name, 'imgid': i, 'cocoid': by_name[name],
                       'split': ['test', 'val', 'restval', 'train'][min(i // 2, 3)], 'sentences': sentences})
    (tmp_path / 'dataset_coco.json').write_text(json.dumps({'images': images, 'dataset': 'coco'}))
    prepro_karpathy.main(['--split_file', str(tmp_path / 'dataset_coco.json'), '--output_dir', str(tmp_path)])
    splits = {s: json.load(open(tmp_path / f'captions_karpathy_{s}.json')) for s in ('train', 'val', 'test')}
    assert [len(s['images']) for s in splits.values()] == [8, 2, 2]
    assert splits['val']['images'][0]['file_name'] == f'val2014/{names[2]}'
    assert splits['test']['images'][0]['id'] == by_name[names[0]]
    models = tmp_path / 'models'
    assert train.main(['--cnn', 'efficientnet-lite0', '--image_dir', str(root),
                       '--caption_path', str(tmp_path / 'captions_karpathy_train.json'),
                       '--val_caption_path', str(tmp_path / 'captions_karpathy_val.json'), '--val_image_dir', str(root),
                       '--vocab_path', coco_sample['vocab'], '--model_path', str(models), '--crop_size', '48',
                       '--embed_size', '16', '--hidden_size', '16', '--batch_size', '10', '--num_epochs', '2',
                       '--num_workers', '0', '--device', 'cpu']) == 0
    log = [json.loads(line) for line in open(models / 'train_log.jsonl')]
    validation = [r for r in log if 'val_loss' in r]
    assert [r['epoch'] for r in validation] == [1, 2] and all(r['val_loss'] > 0 for r in validation)
    assert (models / 'encoder-best.ckpt').exists() and (models / 'decoder-best.ckpt').exists()
    evaluate.main(['--caption_path', str(tmp_path / 'captions_karpathy_test.json'), '--image_dir', str(root),
                   '--encoder_path', str(models / 'encoder-best.ckpt'), '--decoder_path', str(models / 'decoder-best.ckpt'),
                   '--vocab_path', coco_sample['vocab'], '--output', str(tmp_path / 'r.json'),
                   '--scores', str(tmp_path / 's.json'), '--num_workers', '0'])
    assert len(json.load(open(tmp_path / 'r.json'))) == 2 and 'CIDEr' in json.load(open(tmp_path / 's.json'))


@needs_java
def test_bootstrap_gives_reproducible_95_percent_intervals(tmp_path, capsys):
    caption_path = os.path.join(TEST_DATA, 'captions.json')
    annotations = json.load(open(caption_path))['annotations']
    results = list({a['image_id']: {'image_id': a['image_id'], 'caption': a['caption']} for a in annotations}.values())
    for r in results[::2]:
        r['caption'] = 'a dog runs on the grass'  # half right (their own first reference), half wrong
    json.dump(results, open(tmp_path / 'results.json', 'w'))
    found = []
    for _ in range(2):
        evaluate.main(['--caption_path', caption_path, '--results', str(tmp_path / 'results.json'), '--bootstrap',
                       '100', '--scores', str(tmp_path / 'scores.json')])
        found.append(json.load(open(tmp_path / 'scores.json')))
    assert found[0] == found[1]
    for name in ('Bleu_4', 'METEOR', 'CIDEr'):
        low, high = found[0][f'{name}_95']
        assert low < found[0][name] < high, name
    assert '95% interval, 100 bootstrap resamples of the images' in capsys.readouterr().out


def test_sample_output_is_scored_by_evaluate_and_nothing_unnamed_is_written(tiny_model, tmp_path, monkeypatch, capsys):
    import sample
    monkeypatch.chdir(tmp_path)
    images = os.path.join(TEST_DATA, 'images')
    caption_path = os.path.join(TEST_DATA, 'captions.json')
    model = ['--encoder_path', tiny_model['encoder'], '--decoder_path', tiny_model['decoder'],
             '--vocab_path', tiny_model['vocab'], '--device', 'cpu', '--num_workers', '0']
    sample.main(['--image', images, '--output', 'mine.json', *model])
    written = json.loads((tmp_path / 'mine.json').read_text())
    assert written[0]['image_id'] == 790 and written[0]['file_name'].endswith('000000000790.jpg')
    capsys.readouterr()
    evaluate.main(['--caption_path', caption_path, '--results', 'mine.json'])
    assert 'CIDEr' in capsys.readouterr().out
    old = [{'file_name': r['file_name'], 'caption': r['caption']} for r in written]  # sample.py's earlier format
    (tmp_path / 'old.json').write_text(json.dumps(old))
    evaluate.main(['--caption_path', caption_path, '--results', 'old.json'])
    evaluate.main(['--caption_path', caption_path, '--image_dir', images, *model])
    assert sorted(os.listdir(tmp_path)) == ['mine.json', 'old.json']  # no results.json, no scores.json
    evaluate.main(['--caption_path', caption_path, '--image_dir', images, '--scores', 's.json', *model])
    assert capsys.readouterr().err.strip().splitlines()[-1] == 'wrote scores in s.json'
