// Traffic capture for enrolled pods: a tc ingress program that hands TCP flows of enrolled pods
// to ztunnel's transparent listeners with bpf_sk_assign, for IPv4 and IPv6.
//
// Attached at tc ingress of an enrolled pod's host-side veth (packets leaving the pod) and of
// the node's uplinks (packets arriving from other nodes). For each IP packet:
//   - skip packets carrying ztunnel's own socket mark (a pod cannot forge it: the mark is
//     scrubbed when a packet crosses from the pod's namespace into the node's);
//   - read the addresses; a packet neither from nor to an enrolled pod goes its way untouched;
//   - walk the headers with bpf_skb_load_bytes (so options, IPv6 extension headers and
//     non-linear packets are all read the same way). A packet of an enrolled pod whose transport
//     cannot be determined (truncated or malformed header, an unknown IPv6 extension header, a
//     header chain longer than we walk) or that is a fragment is DROPPED and counted: it might
//     be TCP that would otherwise bypass ztunnel;
//   - non-TCP transports (UDP, ICMP, ...) are not captured;
//   - if a non-listening socket owns the exact 4-tuple (a flow already handed to ztunnel, or a
//     connection ztunnel made with a pod's address), assign the packet to it;
//   - else a SYN from an enrolled pod, whatever its destination port, goes to the outbound
//     listener (15001); a SYN to an enrolled pod goes to the HBONE listener (15008) when the
//     destination port is 15008, otherwise to the inbound plaintext listener (15006);
//   - everything else of an enrolled pod (a SYN with no listener, a segment of a flow no
//     ztunnel socket owns, e.g. after ztunnel died) is dropped and counted: fail closed.
// Assigned packets get the redirect mark, which policy routing delivers locally.
//
// Maps are pinned by name (the loader gives the pin directory), so they outlive the loader and
// a restarted ztunnel adopts them.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
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

// An address as the `enrolled` map keys it: IPv6, or IPv4 mapped (::ffff:a.b.c.d).
struct addr {
    __u32 w[4];
};

// Indexes into `stats`; mirrors `STAT_NAMES` in src/redirector.rs.
enum stat {
    STAT_OUTBOUND = 0,
    STAT_INBOUND = 1,
    STAT_HBONE = 2,
    STAT_ESTABLISHED = 3,
    STAT_NO_LISTENER = 4,
    STAT_ASSIGN_FAILED = 5,
    STAT_UNPARSEABLE = 6,
    STAT_FRAGMENT = 7,
    STAT_NO_SOCKET = 8,
    STAT_COUNT = 9,
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct addr);
    __type(value, __u32);  // ifindex of the pod's host-side interface
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} enrolled SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct settings);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} settings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, STAT_COUNT);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
// IPv6 extension headers walked before giving up (and dropping, for an enrolled pod).
#define MAX_EXT_HEADERS 8

static __always_inline void count(__u32 which) {
    __u64 *n = bpf_map_lookup_elem(&stats, &which);
    if (n)
        *n += 1;
}

static __always_inline int is_enrolled(struct addr *a) {
    return bpf_map_lookup_elem(&enrolled, a) != 0;
}

// Assigns the packet to `sk` and releases it. Returns 0 on success.
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 mark) {
    long err = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (err == 0)
        skb->mark = mark;
    return (int)err;
}

// What the header walk found.
struct flow {
    struct bpf_sock_tuple tuple;
    __u32 v6;
    __u32 from_pod;
    __u16 dport;  // host order
    __u8 syn;
    __u8 ack;
};

// Drops a packet of an enrolled pod, counting why.
static __always_inline int drop(__u32 why) {
    count(why);
    return TC_ACT_SHOT;
}

// Reads the TCP header at `off` into `flow`. Returns 0, or -1 when it cannot be read.
static __always_inline int read_tcp(struct __sk_buff *skb, __u32 off, struct flow *flow) {
    struct tcphdr tcp;
    if (bpf_skb_load_bytes(skb, off, &tcp, sizeof(tcp)) < 0)
        return -1;
    if (tcp.doff < 5)
        return -1;
    flow->dport = bpf_ntohs(tcp.dest);
    flow->syn = tcp.syn;
    flow->ack = tcp.ack;
    if (flow->v6) {
        flow->tuple.ipv6.sport = tcp.source;
        flow->tuple.ipv6.dport = tcp.dest;
    } else {
        flow->tuple.ipv4.sport = tcp.source;
        flow->tuple.ipv4.dport = tcp.dest;
    }
    return 0;
}

// Looks up the socket of the flow's tuple (the verifier wants a constant tuple size).
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct flow *flow) {
    if (flow->v6)
        return bpf_skc_lookup_tcp(skb, &flow->tuple, sizeof(flow->tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    return bpf_skc_lookup_tcp(skb, &flow->tuple, sizeof(flow->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
}

// Outcome of parsing: capture the flow, let the packet go untouched, or drop it.
enum verdict {
    V_TCP = 0,
    V_PASS = 1,
    V_DROP_UNPARSEABLE = 2,
    V_DROP_FRAGMENT = 3,
};

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow *flow) {
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return V_PASS;  // too short to carry addresses: nothing to attribute it to
    struct addr src = {.w = {0, 0, bpf_htonl(0xffff), ip.saddr}};
    struct addr dst = {.w = {0, 0, bpf_htonl(0xffff), ip.daddr}};
    flow->from_pod = is_enrolled(&src);
    if (!flow->from_pod && !is_enrolled(&dst))
        return V_PASS;
    if (ip.version != 4 || ip.ihl < 5)
        return V_DROP_UNPARSEABLE;
    if (ip.protocol != IPPROTO_TCP)
        return V_PASS;
    if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
        return V_DROP_FRAGMENT;
    flow->tuple.ipv4.saddr = ip.saddr;
    flow->tuple.ipv4.daddr = ip.daddr;
    if (read_tcp(skb, ETH_HLEN + ip.ihl * 4, flow) < 0)
        return V_DROP_UNPARSEABLE;
    return V_TCP;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, struct flow *flow) {
    struct ipv6hdr ip;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
        return V_PASS;
    struct addr src, dst;
    __builtin_memcpy(src.w, ip.saddr.in6_u.u6_addr32, sizeof(src.w));
    __builtin_memcpy(dst.w, ip.daddr.in6_u.u6_addr32, sizeof(dst.w));
    flow->from_pod = is_enrolled(&src);
    if (!flow->from_pod && !is_enrolled(&dst))
        return V_PASS;
    if (ip.version != 6)
        return V_DROP_UNPARSEABLE;
    __builtin_memcpy(flow->tuple.ipv6.saddr, src.w, sizeof(src.w));
    __builtin_memcpy(flow->tuple.ipv6.daddr, dst.w, sizeof(dst.w));
    flow->v6 = 1;

    __u8 next = ip.nexthdr;
    __u32 off = ETH_HLEN + sizeof(ip);
#pragma unroll
    for (int i = 0; i < MAX_EXT_HEADERS; i++) {
        __u8 ext[2];
        switch (next) {
        case IPPROTO_TCP:
            return read_tcp(skb, off, flow) < 0 ? V_DROP_UNPARSEABLE : V_TCP;
        case IPPROTO_HOPOPTS:
        case IPPROTO_ROUTING:
        case IPPROTO_DSTOPTS:
            if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
                return V_DROP_UNPARSEABLE;
            next = ext[0];
            off += ((__u32)ext[1] + 1) * 8;
            break;
        case IPPROTO_AH:
            if (bpf_skb_load_bytes(skb, off, ext, sizeof(ext)) < 0)
                return V_DROP_UNPARSEABLE;
            next = ext[0];
            off += ((__u32)ext[1] + 2) * 4;
            break;
        case IPPROTO_FRAGMENT:
            return V_DROP_FRAGMENT;
        // Transports we do not capture, and headers that end the chain for us.
        case IPPROTO_UDP:
        case IPPROTO_ICMPV6:
        case IPPROTO_NONE:
        case IPPROTO_ESP:
        case IPPROTO_SCTP:
        case IPPROTO_UDPLITE:
            return V_PASS;
        default:
            // Mobility, HIP, shim6 or anything unknown: it could hide TCP.
            return V_DROP_UNPARSEABLE;
        }
    }
    return V_DROP_UNPARSEABLE;
}

SEC("classifier")
int ztunnel_capture(struct __sk_buff *skb) {
    __u32 zero = 0;
    struct settings *cfg = bpf_map_lookup_elem(&settings, &zero);
    if (!cfg)
        return TC_ACT_OK;
    if (cfg->ztunnel_mark && skb->mark == cfg->ztunnel_mark)
        return TC_ACT_OK;

    struct flow flow = {};
    int v;
    if (skb->protocol == bpf_htons(ETH_P_IP))
        v = parse_ipv4(skb, &flow);
    else if (skb->protocol == bpf_htons(ETH_P_IPV6))
        v = parse_ipv6(skb, &flow);
    else
        return TC_ACT_OK;
    if (v == V_PASS)
        return TC_ACT_OK;
    if (v == V_DROP_FRAGMENT)
        return drop(STAT_FRAGMENT);
    if (v != V_TCP)
        return drop(STAT_UNPARSEABLE);

    // A flow that already has its socket follows it.
    struct bpf_sock *sk = lookup(skb, &flow);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            if (assign(skb, sk, cfg->redirect_mark) != 0)
                return drop(STAT_ASSIGN_FAILED);
            count(STAT_ESTABLISHED);
            return TC_ACT_OK;
        }
        bpf_sk_release(sk);
    }

    // Only a SYN starts a flow; any other segment of an enrolled pod without a ztunnel socket
    // would travel in plaintext.
    if (!flow.syn || flow.ack)
        return drop(STAT_NO_SOCKET);

    __u16 port;
    __u32 stat;
    if (flow.from_pod) {
        port = cfg->outbound_port;
        stat = STAT_OUTBOUND;
    } else if (flow.dport == cfg->hbone_port) {
        port = cfg->hbone_port;
        stat = STAT_HBONE;
    } else {
        port = cfg->inbound_port;
        stat = STAT_INBOUND;
    }

    if (flow.v6)
        flow.tuple.ipv6.dport = bpf_htons(port);
    else
        flow.tuple.ipv4.dport = bpf_htons(port);
    sk = lookup(skb, &flow);
    if (!sk)
        return drop(STAT_NO_LISTENER);
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return drop(STAT_NO_LISTENER);
    }
    if (assign(skb, sk, cfg->redirect_mark) != 0)
        return drop(STAT_ASSIGN_FAILED);
    count(stat);
    return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual MIT/GPL";
