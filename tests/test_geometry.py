import numpy as np
import pytest

from caloexp import geometry as geo
from caloexp.errors import InputError

NAMES = ["dataset_1_photons", "dataset_1_pions", "dataset_2", "dataset_3"]
VOXELS = {"dataset_1_photons": 368, "dataset_1_pions": 533, "dataset_2": 6480, "dataset_3": 40500}


@pytest.mark.parametrize("name", NAMES)
def test_builtin_matches_official_xml(name, shared_data):
    ours = geo.builtin(name)
    official = geo.from_xml(shared_data / "calochallenge_binning" / f"binning_{name}.xml")
    assert ours.n_voxels == official.n_voxels == VOXELS[name]
    assert ours.layer_ids == official.layer_ids
    for a, b in zip(ours.layers, official.layers):
        assert a.n_alpha == b.n_alpha
        np.testing.assert_allclose(a.r_edges, b.r_edges, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.voxel_eta, official.voxel_eta)


def test_voxel_order_is_layer_then_alpha_then_r():
    g = geo.builtin("dataset_1_photons")
    # layer 1 (second non-empty layer): 10 alpha x 16 r, starting after layer 0's 8 voxels
    s = g.layer_slice(1)
    assert (s.start, s.stop) == (8, 168)
    r = g.voxel_r[s].reshape(10, 16)
    alpha = g.voxel_alpha[s].reshape(10, 16)
    assert np.all(r == r[0])                      # r runs fastest
    assert np.all(alpha.T == alpha[:, 0])         # alpha constant along r
    np.testing.assert_allclose(alpha[:, 0], -np.pi + np.pi / 10 * (2 * np.arange(10) + 1))
    assert r[0, 0] == 1.0 and r[0, -1] == 175.0   # centres of [0,2] and [150,200]


def test_single_alpha_layers_have_alpha_zero_and_phi_zero():
    g = geo.builtin("dataset_1_photons")
    s = g.layer_slice(0)
    assert np.all(g.voxel_alpha[s] == 0) and np.all(g.voxel_phi[s] == 0)
    np.testing.assert_allclose(g.voxel_eta[s], g.voxel_r[s])


def test_layer_energies_and_images():
    g = geo.builtin("dataset_1_photons")
    x = np.zeros((2, g.n_voxels))
    x[0, g.layer_slice(2).start + 3] = 5.0
    x[1, :] = 1.0
    le = g.layer_energies(x)
    assert le.shape == (2, 5)
    assert le[0].tolist() == [0, 0, 5, 0, 0]
    assert le[1].tolist() == g.voxels_per_layer.tolist()
    assert g.layer_image(x, 2).shape == (2, 10, 19)
    assert g.layer_image(x, 2)[0, 0, 3] == 5.0


def test_regular_grid_shapes():
    assert geo.builtin("dataset_3").grid_shape == (45, 50, 18)
    assert not geo.builtin("dataset_1_photons").is_regular


def test_lookup_by_alias_xml_and_voxel_count(shared_data):
    assert geo.load("photons").name == "dataset_1_photons"
    assert geo.load(str(shared_data / "calochallenge_binning" / "binning_dataset_2.xml")).n_voxels == 6480
    assert geo.by_voxel_count(533).name == "dataset_1_pions"
    assert geo.by_voxel_count(7) is None


def test_bad_geometry_inputs(tmp_path):
    with pytest.raises(InputError, match="unknown geometry 'nope'"):
        geo.load("nope")
    with pytest.raises(InputError, match="not found"):
        geo.from_xml(tmp_path / "missing.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<Bins><Bin><Layer id='0' r_edges='0,5,3' n_bin_alpha='1'/></Bin></Bins>")
    with pytest.raises(InputError, match="not increasing"):
        geo.from_xml(bad)
    broken = tmp_path / "broken.xml"
    broken.write_text("<Bins><Bin>")
    with pytest.raises(InputError, match="not a valid binning XML"):
        geo.from_xml(broken)


@pytest.mark.parametrize("layers,problem", [
    ("<Layer id='0' r_edges='0,5,10' n_bin_alpha='0'/>", "layer 0 n_bin_alpha=0 (must be >= 1)"),
    ("<Layer id='0' r_edges='0,5,10' n_bin_alpha='-3'/>", "layer 0 n_bin_alpha=-3 (must be >= 1)"),
    ("<Layer id='0' r_edges='0,nan,10' n_bin_alpha='1'/>", "layer 0 r_edges contain NaN/inf"),
    ("<Layer id='0' r_edges='0,5,inf' n_bin_alpha='1'/>", "layer 0 r_edges contain NaN/inf"),
    ("<Layer id='0' r_edges='0,5,5,10' n_bin_alpha='1'/>", "layer 0 r_edges are not increasing"),
    ("<Layer id='0' r_edges='0,5' n_bin_alpha='1'/><Layer id='0' r_edges='0,7' n_bin_alpha='1'/>",
     "duplicate layer id 0"),
    ("<Layer id='1' r_edges='0,5' n_bin_alpha='1'/><Layer id='2' r_edges='0' n_bin_alpha='1'/>"
     "<Layer id='2' r_edges='0' n_bin_alpha='1'/>", "duplicate layer id 2"),
])
def test_invalid_binning_values_are_one_line_naming_file_and_layer(tmp_path, layers, problem):
    bad = tmp_path / "binning_bad.xml"
    bad.write_text(f"<Bins><Bin pid='22' name='photon'>{layers}</Bin></Bins>")
    with pytest.raises(InputError) as err:
        geo.from_xml(bad)
    msg = str(err.value)
    assert msg == f"{bad}: {problem}" or msg.startswith(f"{bad}: {problem}"), msg
    assert "\n" not in msg


def test_official_binning_files_pass_validation(shared_data):
    """The stricter checks accept every official XML (read from the shared data, never copied)."""
    for name in NAMES:
        g = geo.from_xml(shared_data / "calochallenge_binning" / f"binning_{name}.xml")
        assert g.n_voxels == VOXELS[name] and len(set(g.layer_ids)) == g.n_layers
