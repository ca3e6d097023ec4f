// Traffic capture for enrolled pods: a tc ingress program that hands TCP flows of enrolled pods
// to ztunnel's transparent listeners with bpf_sk_assign.
//
// Attached at tc ingress of an enrolled pod's host-side veth (packets leaving the pod) and of
// the node's uplinks (packets arriving from other nodes). For each IPv4 TCP packet:
//   - skip packets carrying ztunnel's own socket mark;
//   - if a non-listening socket owns the exact 4-tuple (a flow already handed to ztunnel, or a
//     connection ztunnel made with a pod's address), assign the packet to it;
//   - else, for a SYN from an enrolled pod (not to one of ztunnel's ports): assign it to the
//     outbound listener (15001);
//   - else, for a SYN to an enrolled pod: assign it to the HBONE listener (15008) when the
//     destination port is 15008, otherwise to the inbound plaintext listener (15006);
//   - a SYN that should be captured but finds no listener is dropped (fail closed).
// Assigned packets get the redirect mark, which policy routing delivers locally.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Written by the loader as a [u32; 5] (src/redirector.rs, `Settings::to_words`).
struct settings {
    __u32 redirect_mark;
    __u32 ztunnel_mark;
    __u32 outbound_port;
    __u32 inbound_port;
    __u32 hbone_port;
};

// Indexes into `stats`; mirrors `Stat` in src/redirector.rs.
enum stat {
    STAT_OUTBOUND = 0,
    STAT_INBOUND = 1,
    STAT_HBONE = 2,
    STAT_ESTABLISHED = 3,
    STAT_NO_LISTENER = 4,
    STAT_ASSIGN_FAILED = 5,
    STAT_COUNT = 6,
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, __u32);   // IPv4 address, network order
    __type(value, __u8);  // 1 = enrolled
} enrolled SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct settings);
} settings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, STAT_COUNT);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 which) {
    __u64 *n = bpf_map_lookup_elem(&stats, &which);
    if (n)
        *n += 1;
}

// Assigns the packet to `sk` and releases it. Returns 0 on success.
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 mark) {
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err == 0)
        skb->mark = mark;
    return (int)err;
}

SEC("classifier")
int ztunnel_capture(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;

    if (skb->protocol != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl != 5)
        return TC_ACT_OK;
    struct tcphdr *tcp = (void *)(ip + 1);
    if ((void *)(tcp + 1) > end)
        return TC_ACT_OK;

    __u32 zero = 0;
    struct settings *cfg = bpf_map_lookup_elem(&settings, &zero);
    if (!cfg)
        return TC_ACT_OK;
    if (cfg->ztunnel_mark && skb->mark == cfg->ztunnel_mark)
        return TC_ACT_OK;

    __u32 saddr = ip->saddr;
    __u32 daddr = ip->daddr;
    int from_pod = bpf_map_lookup_elem(&enrolled, &saddr) != 0;
    int to_pod = !from_pod && bpf_map_lookup_elem(&enrolled, &daddr) != 0;
    if (!from_pod && !to_pod)
        return TC_ACT_OK;

    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = saddr;
    tuple.ipv4.daddr = daddr;
    tuple.ipv4.sport = tcp->source;
    tuple.ipv4.dport = tcp->dest;

    // A flow that already has its socket follows it.
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            if (assign(skb, sk, cfg->redirect_mark) == 0)
                count(STAT_ESTABLISHED);
            else
                count(STAT_ASSIGN_FAILED);
            return TC_ACT_OK;
        }
        bpf_sk_release(sk);
    }

    // Only new flows are captured; anything else goes its normal way.
    if (!tcp->syn || tcp->ack)
        return TC_ACT_OK;

    __u16 dport = bpf_ntohs(tcp->dest);
    __u16 port;
    __u32 stat;
    if (from_pod) {
        if (dport == cfg->outbound_port || dport == cfg->inbound_port || dport == cfg->hbone_port)
            return TC_ACT_OK;
        port = cfg->outbound_port;
        stat = STAT_OUTBOUND;
    } else if (dport == cfg->hbone_port) {
        port = cfg->hbone_port;
        stat = STAT_HBONE;
    } else {
        port = cfg->inbound_port;
        stat = STAT_INBOUND;
    }

    tuple.ipv4.dport = bpf_htons(port);
    sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) {
        count(STAT_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        count(STAT_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    if (assign(skb, sk, cfg->redirect_mark) != 0) {
        count(STAT_ASSIGN_FAILED);
        return TC_ACT_SHOT;
    }
    count(stat);
    return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual MIT/GPL";
