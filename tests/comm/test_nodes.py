"""Rank environments from where the learner ranks landed (no Ray needed)."""

from comm.nodes import NodePlace, gloo_interface, interface_of, rank_environments


def test_ranks_on_two_nodes_get_the_rendezvous_at_rank_0s_node_and_local_numbering():
    places = [NodePlace("a", "10.1.0.1", ["3"]), NodePlace("b", "10.1.0.2", ["0"]), NodePlace("a", "10.1.0.1", ["1"]),
              NodePlace("b", "10.1.0.2", ["5"])]
    envs = rank_environments(places, 29555)
    assert [e.master_addr for e in envs] == ["10.1.0.1"] * 4 and {e.master_port for e in envs} == {29555}
    assert [(e.rank, e.local_rank, e.local_world_size) for e in envs] == [(0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2)]
    # every rank of a node sees that node's learner GPUs in local-rank order: cuda:LOCAL_RANK is its own
    assert [e.cuda_visible_devices for e in envs] == ["3,1", "0,5", "3,1", "0,5"]
    v = envs[2].variables()
    assert v["RANK"] == "2" and v["WORLD_SIZE"] == "4" and v["LOCAL_RANK"] == "1" and v["CUDA_VISIBLE_DEVICES"] == "3,1"
    assert v["MASTER_ADDR"] == "10.1.0.1" and v["MASTER_PORT"] == "29555"


def test_cpu_ranks_leave_the_visible_devices_alone():
    envs = rank_environments([NodePlace("a", "10.1.0.1", []), NodePlace("a", "10.1.0.1", [])], 1234)
    assert [e.cuda_visible_devices for e in envs] == [None, None]
    assert "CUDA_VISIBLE_DEVICES" not in envs[0].variables()
    assert [e.local_rank for e in envs] == [0, 1]


def test_the_interface_holding_an_address_is_found(monkeypatch):
    assert interface_of("127.0.0.1") is not None
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: on no interface here
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert gloo_interface("127.0.0.1") == {"GLOO_SOCKET_IFNAME": interface_of("127.0.0.1")}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    assert gloo_interface("127.0.0.1") == {}  # the user's choice wins
