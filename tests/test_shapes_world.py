"""Tests for the shapes world (toy/shapes_world.py) and its FSQ image tokenizer (toy/fsq.py)."""

import doctest
import math
from collections import deque

import numpy as np
import pytest
import torch

from toy import fsq as fsq_module
from toy import shapes_world as sw
from toy.fsq import FSQ, FSQAutoencoder, train_tokenizer


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def render_text(text: str, seed: int = 0) -> torch.Tensor:
    """(1, 3, 32, 32) ground-truth render of a prompt."""
    return sw.render([sw.parse_prompt(text)], gen(seed))


# ----------------------------------------------------------------------------- prompts


def test_docstring_examples_run():
    for module in (sw, fsq_module):
        assert doctest.testmod(module).failed == 0


def test_encode_decode_parse_round_trip_on_every_prompt():
    specs = sw.prompt_set("train") + sw.prompt_set("heldout")
    assert len(specs) == 111
    for spec in specs:
        ids = sw.encode_prompt(spec)
        assert len(ids) == sw.MAX_PROMPT_LEN and all(0 <= i < len(sw.VOCAB) for i in ids)
        assert sw.parse_prompt(sw.decode_prompt(ids)) == spec
        assert sw.prompt_text(spec) == sw.decode_prompt(ids)
    assert sw.encode_prompts(specs[:3]).shape == (3, sw.MAX_PROMPT_LEN)


def test_categories_of_templates():
    for category in sw.CATEGORIES:
        assert all(s.category == category for s in sw.prompt_set("train", [category]) + sw.prompt_set("heldout", [category]))
    assert sw.parse_prompt("two red circles on the left").category == "other"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: sw.ObjectSpec("hexagon"), "shape"),
        (lambda: sw.ObjectSpec("circle", colour="purple"), "colour"),
        (lambda: sw.ObjectSpec("circle", count=5), "count"),
        (lambda: sw.ObjectSpec("circle", position="middle"), "position"),
        (lambda: sw.ObjectSpec("circle", count=3, position="left"), "count"),
        (lambda: sw.PromptSpec(()), "objects"),
        (lambda: sw.PromptSpec((sw.ObjectSpec("circle"), sw.ObjectSpec("circle", "red"))), "objects"),
        (lambda: sw.parse_prompt("a circle and"), "text"),
        (lambda: sw.parse_prompt("two circle"), "text"),
        (lambda: sw.decode_prompt([0, 99]), "ids"),
        (lambda: sw.sample_specs(3, gen(), split="test"), "split"),
        (lambda: sw.sample_specs(3, gen(), categories=["shapes"]), "categories"),
        (lambda: sw.score_images(torch.zeros(2, 3, 16, 16), []), "images"),
        (lambda: sw.score_images(torch.zeros(2, 3, 32, 32), [sw.parse_prompt("a circle")]), "specs"),
        (lambda: FSQ([8, 1]), "levels"),
        (lambda: FSQAutoencoder().decode(torch.zeros(2, 10, dtype=torch.long)), "codes"),
        (lambda: FSQAutoencoder().encode(torch.zeros(2, 3, 16, 16)), "images"),
    ],
)
def test_bad_input_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_splits_are_disjoint_and_cover_every_category():
    train, heldout = set(sw.prompt_set("train")), set(sw.prompt_set("heldout"))
    assert not train & heldout
    for category in sw.CATEGORIES:
        assert sw.prompt_set("train", [category]) and sw.prompt_set("heldout", [category])
    assert set(sw.sample_specs(500, gen(), "heldout")) <= heldout
    assert set(sw.sample_specs(500, gen(), "train")) <= train
    drawn = sw.sample_specs(600, gen(), "train")
    counts = {c: sum(s.category == c for s in drawn) for c in sw.CATEGORIES}
    assert min(counts.values()) > 60  # categories are drawn uniformly


# ----------------------------------------------------------------------------- rendering


def test_rendering_is_deterministic_per_seed():
    specs = sw.sample_specs(64, gen(1))
    a, b, c = sw.render(specs, gen(2)), sw.render(specs, gen(2)), sw.render(specs, gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (64, 3, 32, 32) and a.min() >= 0 and a.max() <= 1


def test_rendered_objects_do_not_touch_and_keep_their_colour():
    specs = sw.sample_specs(300, gen(4))
    images = sw.render(specs, gen(5))
    on = images.amax(1) > 0  # (B, H, W)
    assert set(images.unique().tolist()) <= {0.0, 1.0}  # pure palette colours, no blending from overlap
    comps = sw.find_objects(images)
    n_objects = torch.tensor([sum(o.count for o in s.objects) for s in specs])
    assert torch.equal(torch.from_numpy(np.bincount(comps.image, minlength=len(specs))), n_objects)
    assert int(comps.area.sum()) == int(on.sum())


def test_boxes_lie_on_the_tokenizer_grid_inside_the_image():
    g = gen(9)
    for spec in sw.sample_specs(300, gen(8)):
        for _, _, x0, y0, size in sw._place(spec, g):
            assert x0 % sw.GRID == 0 and y0 % sw.GRID == 0 and size in sw.SIZES
            assert 0 <= x0 and x0 + size <= sw.IMAGE_SIZE and 0 <= y0 and y0 + size <= sw.IMAGE_SIZE


@pytest.mark.parametrize("shape", sw.SHAPES)
def test_every_size_is_classified_as_its_shape(shape):
    sizes = torch.tensor(sw.SIZES)
    n = len(sizes)
    masks = sw.shape_masks(torch.full((n,), sw.SHAPES.index(shape)), torch.full((n,), 3), torch.full((n,), 5), sizes)
    images = masks[:, None].float().expand(n, 3, -1, -1).clone()
    images[:, 2] = 0  # yellow
    comps = sw.find_objects(images)
    assert len(comps.shape) == n
    assert (comps.shape == sw.SHAPES.index(shape)).all(), comps.fill


# ----------------------------------------------------------------------------- scoring


def test_ground_truth_renders_get_full_marks_in_every_category():
    specs = sw.sample_specs(600, gen(6), "train") + sw.sample_specs(600, gen(7), "heldout")
    others = ("two red circles on the left", "two squares on the top", "two circles and two squares")
    specs += [sw.parse_prompt(t) for t in others]
    result = sw.score_images(sw.render(specs, gen(8)), specs)
    assert result["score"].min() == 1 and result["strict"].min() == 1
    assert set(result["category_accuracy"]) == {*sw.CATEGORIES, "other"}
    assert all(acc == 1 for acc in result["category_accuracy"].values())
    assert result["geneval"] == 1
    assert result["geneval_se"] == 0


def test_geneval_and_its_standard_error_match_a_loop_over_categories():
    specs = sw.sample_specs(300, gen(9), "train")
    images = sw.render(specs, gen(10))
    blank = torch.rand(len(specs), generator=gen(11)) < 0.4
    images[blank] = 0  # a black image passes no check
    result = sw.score_images(images, specs)
    means, variances = [], []
    for c in sw.CATEGORIES:
        xs = [0.0 if blank[i] else 1.0 for i in range(len(specs)) if specs[i].category == c]
        m = sum(xs) / len(xs)
        means.append(m)
        variances.append(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    assert result["geneval"] == pytest.approx(sum(means) / 6)
    assert result["geneval_se"] == pytest.approx(math.sqrt(sum(variances)) / 6)
    assert 0 < result["geneval_se"] < 0.1


@pytest.mark.parametrize(
    ("prompt", "drawn", "failing", "passing"),
    [
        ("a red circle", "a blue circle", "colour", "shape"),
        ("a triangle", "a square", "shape", None),
        ("a yellow square", "a yellow circle", "shape", None),
        ("two circles", "three circles", "count", "shape"),
        ("three triangles", "two triangles", "count", "shape"),
        ("two squares", "a square", "count", "shape"),
        ("a square on the left", "a square on the right", "position", "shape"),
        ("a circle on the top", "a circle on the bottom", "position", "shape"),
        ("a red circle and a blue square", "a blue circle and a red square", "colour", "shape"),
        ("a circle and a square", "a circle and a triangle", "shape", None),
    ],
)
def test_scorer_rejects_wrong_images_with_the_right_check(prompt, drawn, failing, passing):
    spec = sw.parse_prompt(prompt)
    result = sw.score_images(render_text(drawn), [spec])
    assert result["strict"][0] == 0
    assert result["checks"][failing][0] == 0
    assert 0 <= result["score"][0] < 1
    assert result["category_accuracy"][spec.category] == 0
    if passing is not None:
        assert result["checks"][passing][0] == 1
        assert result["score"][0] > 0


def test_scorer_on_blank_and_noise_images():
    specs = [sw.parse_prompt("a red circle"), sw.parse_prompt("two squares")]
    blank = sw.score_images(torch.zeros(2, 3, 32, 32), specs)
    assert blank["score"].tolist() == [0, 0]
    noise = sw.score_images(torch.rand(2, 3, 32, 32, generator=gen()), specs)
    assert (noise["score"] >= 0).all() and (noise["score"] <= 1).all()
    full = sw.score_images(torch.ones(2, 3, 32, 32) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1), specs)
    assert full["strict"].tolist() == [0, 0]  # one image-sized red blob is no object


def test_scenes_name_each_objects_shape_colour_and_grid_cell():
    image = torch.zeros(2, 3, 32, 32)
    square = sw.shape_masks(torch.tensor([0]), torch.tensor([4]), torch.tensor([8]), torch.tensor([8]))[0]
    image[0, 0] = square.float()  # a red square, pixels x 4..11, y 8..15: centroid (8, 12)
    image[1, 2] = torch.roll(square, sw.GRID, dims=1).float()  # blue, one grid cell to the right
    keys = sw.scenes(image)
    assert keys[0] == ((sw.SHAPES.index("square"), sw.COLOURS.index("red"), 8 // sw.GRID, 12 // sw.GRID),)
    assert keys[1] == ((sw.SHAPES.index("square"), sw.COLOURS.index("blue"), 12 // sw.GRID, 12 // sw.GRID),)
    specs = sw.sample_specs(8, gen(3))
    a, b = sw.render(specs, gen(4)), sw.render(specs, gen(5))
    assert sw.scenes(a) == sw.scenes(a.clone()) and sw.scenes(a) != sw.scenes(b)
    assert [len(k) for k in sw.scenes(a)] == [sum(o.count for o in s.objects) for s in specs]
    assert sw.scenes(torch.zeros(1, 3, 32, 32)) == [()]


def draw(objects: list[tuple[str, str, int, int]], size: int = 8) -> torch.Tensor:
    """(1, 3, 32, 32) image of hand-placed objects [(shape, colour, x0, y0), ...] (boxes of side `size`)."""
    image = torch.zeros(1, 3, sw.IMAGE_SIZE, sw.IMAGE_SIZE)
    for shape, colour, x0, y0 in objects:
        mask = sw.shape_masks(torch.tensor([sw.SHAPES.index(shape)]), torch.tensor([x0]), torch.tensor([y0]),
                              torch.tensor([size]))[0]
        image[0] += torch.tensor(sw.PALETTE[colour]).view(3, 1, 1) * mask
    return image


@pytest.mark.parametrize(
    ("prompt", "objects", "score", "extra"),
    [
        ("a triangle", [("triangle", "red", 0, 0)], 1.0, 0),
        ("a triangle", [("triangle", "red", 0, 0), ("square", "blue", 16, 0), ("square", "green", 0, 16),
                        ("circle", "yellow", 16, 16)], 1.0, 3),  # the reward hack: full marks, three extras
        ("a red circle", [("circle", "red", 0, 0), ("square", "blue", 16, 0), ("square", "blue", 16, 16)], 1.0, 2),
        ("a red circle", [("circle", "red", 0, 0), ("circle", "blue", 16, 16)], 1.0, 1),  # wrong colour = not asked for
        ("two circles", [("circle", "red", 0, 0), ("circle", "red", 16, 0), ("circle", "green", 0, 16)], 0.5, 1),
        ("two circles", [("circle", "red", 0, 0), ("circle", "green", 16, 16)], 1.0, 0),
        ("a red circle and a blue square", [("circle", "red", 0, 0), ("square", "blue", 16, 0),
                                            ("square", "red", 0, 16), ("square", "blue", 16, 16)], 1.0, 2),
        ("a square on the left", [("square", "green", 0, 0), ("square", "green", 20, 20)], 0.5, 1),  # one square too many
        ("a circle", [("circle", "red", 0, 0), ("square", "red", 16, 16)], 1.0, 1),
        ("a circle", [], 0.0, 0),
    ],
)
def test_extra_objects_count_what_the_prompt_did_not_ask_for(prompt, objects, score, extra):
    result = sw.score_images(draw(objects), [sw.parse_prompt(prompt)])
    assert result["score"][0].item() == pytest.approx(score)
    assert result["extra"].tolist() == [extra]
    assert result["objects"].tolist() == [len(objects)]


def test_an_unknown_shape_is_an_extra_object():
    image = draw([("circle", "red", 0, 0)])
    image[0, 2, 20:24, 4:16] = 1.0  # a blue 12x4 bar: too elongated for any shape
    result = sw.score_images(image, [sw.parse_prompt("a circle")])
    assert (result["score"].item(), result["objects"].item(), result["extra"].item()) == (1.0, 2, 1)


def test_ground_truth_renders_have_no_extra_objects():
    specs = sw.sample_specs(300, gen(12), "train") + sw.sample_specs(300, gen(13), "heldout")
    result = sw.score_images(sw.render(specs, gen(14)), specs)
    assert result["extra"].max() == 0
    assert result["objects"].tolist() == [sum(o.count for o in s.objects) for s in specs]


def slow_components(classes: np.ndarray) -> list[set]:
    """Reference: breadth-first search over 8-neighbours of equal non-zero class; a set of pixel sets."""
    H, W = classes.shape
    seen, out = np.zeros_like(classes, dtype=bool), []
    for i in range(H):
        for j in range(W):
            if classes[i, j] == 0 or seen[i, j]:
                continue
            comp, queue = set(), deque([(i, j)])
            seen[i, j] = True
            while queue:
                y, x = queue.popleft()
                comp.add((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < H and 0 <= u < W and not seen[v, u] and classes[v, u] == classes[y, x]:
                            seen[v, u] = True
                            queue.append((v, u))
            out.append(frozenset(comp))
    return set(out)


def test_connected_components_match_breadth_first_search():
    g = gen(9)
    classes = torch.randint(0, 3, (6, 32, 32), generator=g) * (torch.rand(6, 32, 32, generator=g) < 0.5)
    classes[0] = 0
    classes[1, 3:29, 3] = 1  # a long snake that needs many propagation rounds
    classes[1, 28, 3:29] = 1
    classes[1, 3:29, 28] = 1
    labels = sw.connected_components(classes)
    for b in range(len(classes)):
        fast = {frozenset(zip(*np.nonzero(labels[b].numpy() == v), strict=True)) for v in labels[b].unique().tolist() if v != 0}
        fast = {frozenset((int(y), int(x)) for y, x in comp) for comp in fast}
        assert fast == slow_components(classes[b].numpy())


# ----------------------------------------------------------------------------- FSQ tokenizer


@pytest.mark.parametrize("levels", [(8, 5, 5), (5, 5, 5), (2, 3, 4, 7)])
def test_fsq_code_level_round_trip(levels):
    q = FSQ(levels)
    codes = torch.arange(q.codebook_size)
    zhat = q.levels_from_codes(codes)  # (K, D)
    assert zhat.shape == (q.codebook_size, len(levels))
    assert zhat.min() >= -1 and zhat.max() <= 1
    assert torch.equal(q.codes_from_levels(zhat), codes)
    assert len({tuple(row) for row in zhat.tolist()}) == q.codebook_size  # distinct level tuples


def test_fsq_quantises_onto_the_grid_with_a_straight_through_gradient():
    q = FSQ((8, 5, 5))
    z = (torch.randn(1000, 3, generator=gen()) * 3).requires_grad_()
    zhat = q(z)
    codes = q.codes_from_levels(zhat)
    assert codes.min() >= 0 and codes.max() < q.codebook_size
    assert torch.allclose(q.levels_from_codes(codes), zhat)  # zhat lies exactly on the grid
    assert codes.unique().numel() > q.codebook_size // 2  # every level is reachable
    zhat.sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (q.bound(z2) / q.half_width).sum().backward()
    assert torch.allclose(z.grad, z2.grad)  # the gradient of round() is the identity


def test_autoencoder_shapes_and_deterministic_init():
    a, b = FSQAutoencoder(width=16, generator=gen(3)), FSQAutoencoder(width=16, generator=gen(3))
    assert all(torch.equal(p, r) for p, r in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    images = sw.render(sw.sample_specs(4, gen()), gen())
    codes = a.encode(images)
    assert codes.shape == (4, a.grid**2) and codes.dtype == torch.long and a.grid == 8
    assert codes.min() >= 0 and codes.max() < a.codebook_size == 200
    recon = a.decode(codes)
    assert recon.shape == (4, 3, 32, 32) and recon.min() >= 0 and recon.max() <= 1


def test_short_tokenizer_training_lowers_loss_and_uses_many_codes():
    g = gen(10)
    data = sw.render(sw.sample_specs(256, g), g)
    model = FSQAutoencoder(width=24, generator=g)
    losses = train_tokenizer(model, data, steps=80, generator=g, batch_size=8, lr=5e-3, warmup=5, progress=False)
    assert len(losses) == 80
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert model.encode(data[:64]).unique().numel() > 20
    assert not model.training
    # a callable data source works too
    fresh = lambda n, gg: sw.render(sw.sample_specs(n, gg), gg)
    train_tokenizer(model, fresh, steps=2, generator=g, batch_size=4, progress=False)


def test_latent_range_penalty_revives_a_saturated_encoder():
    # an encoder scaled 100x saturates FSQ's tanh bound, as 2 of 8 data seeds of the shapes toy did by
    # themselves: reconstruction alone leaves its codes frozen, the latent range penalty revives them
    data = sw.render(sw.sample_specs(256, gen(10)), gen(10))

    def train(latent_penalty):
        model = FSQAutoencoder(width=16, generator=gen(3))
        with torch.no_grad():
            model.encoder[-1].weight.mul_(100)
            model.encoder[-1].bias.mul_(100)
        before = model.encode(data[:64])
        train_tokenizer(model, data, steps=60, generator=gen(4), batch_size=8, warmup=5,
                        latent_penalty=latent_penalty, progress=False)
        return before, model

    before, frozen = train(0.0)
    assert frozen.latents(data[:64]).abs().mean() > 20
    assert frozen.encode(data[:64]).unique().numel() <= before.unique().numel() <= 16
    _, revived = train(0.1)
    assert revived.latents(data[:64]).abs().mean() < 2
    assert revived.encode(data[:64]).unique().numel() > 4 * before.unique().numel()


@pytest.mark.parametrize("kwargs", [dict(latent_penalty=-0.1), dict(latent_limit=0.0)])
def test_tokenizer_training_rejects_bad_latent_penalty(kwargs):
    model = FSQAutoencoder(width=8, generator=gen())
    with pytest.raises(ValueError, match="latent_penalty, latent_limit"):
        train_tokenizer(model, torch.rand(4, 3, 32, 32), steps=1, generator=gen(), progress=False, **kwargs)
