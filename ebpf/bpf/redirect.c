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
//   - DNS of an enrolled pod (UDP or TCP to port 53, any destination) goes to ztunnel's DNS
//     proxy on 15053 when it runs (a UDP socket or TCP listener there), with the original
//     destination kept for the answer's source; without one it goes its way (UDP) or to the
//     outbound listener (TCP) as before. A pod in `dns_bypass` (its
//     `ambient.istio.io/bypass-dns-capture` annotation) is treated the same way: its UDP DNS
//     goes where it was sent, its TCP DNS to the outbound listener like any TCP;
//   - other non-TCP transports (UDP, ICMP, ...) are not captured;
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
//
// A second program, ztunnel_listener (sk_lookup, attached to the node's network namespace by
// each ztunnel for as long as it runs), answers the kernel's own listener lookups for flows of
// enrolled pods with ztunnel's listener of the same role. It matters when a new SYN reuses the
// 4-tuple of a connection whose ztunnel-side socket is in TIME_WAIT (ztunnel closed first, as
// the server it stands in for would have): the SYN above is handed to that TIME_WAIT socket, and
// the kernel, which accepts such a SYN as a new connection only when a listener serves the
// packet's destination port, finds none on the original port. Without this program it answered
// with a bare ACK, the client reset and retried its SYN: a stall and a reset per reused port.
// The listeners come from the per-process `listeners` sockmap (not pinned: its sockets belong to
// the ztunnel that filled it).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>

// Address families as the kernel numbers them (sys/socket.h is not for BPF targets).
#define AF_INET 2
#define AF_INET6 10
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

// Enrolled pods whose DNS is not handed to the DNS proxy (key as `enrolled`; value unused).
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 65536);
    __type(key, struct addr);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} dns_bypass SEC(".maps");

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

// Ports of enrolled addresses whose inbound TCP is left alone (key: port in host order; value
// unused): a host's SSH, say, reachable while no ztunnel runs. Set with `--inbound-bypass-port`.
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} inbound_bypass SEC(".maps");

static __always_inline int inbound_bypassed(__u32 port) {
    return bpf_map_lookup_elem(&inbound_bypass, &port) != 0;
}

// DNS, and the port of ztunnel's DNS proxy (fixed: the settings map is pinned, its layout kept).
#define DNS_PORT 53
#define DNS_PROXY_PORT 15053

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
// IPv6 extension headers walked before giving up (and dropping, for an enrolled pod).
#define MAX_EXT_HEADERS 8

// ztunnel's listeners by role and family: index = role * 2 + (1 for IPv6).
enum listener_role {
    ROLE_OUTBOUND = 0,
    ROLE_INBOUND = 1,
    ROLE_HBONE = 2,
    ROLE_COUNT = 3,
};

struct {
    __uint(type, BPF_MAP_TYPE_SOCKMAP);
    __uint(max_entries, ROLE_COUNT * 2);
    __type(key, __u32);
    __type(value, __u32);  // a socket descriptor when written from user space
} listeners SEC(".maps");

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

// Reads the UDP header at `off` into `flow`. Returns 0, or -1 when it cannot be read.
static __always_inline int read_udp(struct __sk_buff *skb, __u32 off, struct flow *flow) {
    struct udphdr udp;
    if (bpf_skb_load_bytes(skb, off, &udp, sizeof(udp)) < 0)
        return -1;
    flow->dport = bpf_ntohs(udp.dest);
    if (flow->v6) {
        flow->tuple.ipv6.sport = udp.source;
        flow->tuple.ipv6.dport = udp.dest;
    } else {
        flow->tuple.ipv4.sport = udp.source;
        flow->tuple.ipv4.dport = udp.dest;
    }
    return 0;
}

// Sets the tuple's destination port (network order).
static __always_inline void set_dport(struct flow *flow, __u16 port) {
    if (flow->v6)
        flow->tuple.ipv6.dport = port;
    else
        flow->tuple.ipv4.dport = port;
}

// Whether the flow's source (an enrolled pod) opted out of DNS capture.
static __always_inline int dns_bypassed(struct flow *flow) {
    struct addr src = {.w = {0, 0, bpf_htonl(0xffff), flow->tuple.ipv4.saddr}};
    if (flow->v6)
        __builtin_memcpy(src.w, flow->tuple.ipv6.saddr, sizeof(src.w));
    return bpf_map_lookup_elem(&dns_bypass, &src) != 0;
}

// Looks up the socket of the flow's tuple (the verifier wants a constant tuple size).
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct flow *flow) {
    if (flow->v6)
        return bpf_skc_lookup_tcp(skb, &flow->tuple, sizeof(flow->tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
    return bpf_skc_lookup_tcp(skb, &flow->tuple, sizeof(flow->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
}

// The listener port of the flow's role (outbound, HBONE, inbound plaintext).
static __always_inline __u16 role_port(struct flow *flow, struct settings *cfg) {
    if (flow->from_pod)
        return cfg->outbound_port;
    if (flow->dport == cfg->hbone_port)
        return cfg->hbone_port;
    return cfg->inbound_port;
}

// Whether ztunnel listens for the flow's role.
static __always_inline int have_listener(struct __sk_buff *skb, struct flow *flow, struct settings *cfg) {
    struct flow l = *flow;
    __u16 port = bpf_htons(role_port(flow, cfg));
    if (l.v6)
        l.tuple.ipv6.dport = port;
    else
        l.tuple.ipv4.dport = port;
    struct bpf_sock *sk = lookup(skb, &l);
    if (!sk)
        return 0;
    int listening = sk->state == BPF_TCP_LISTEN;
    bpf_sk_release(sk);
    return listening;
}

// Outcome of parsing: capture the flow, let the packet go untouched, or drop it.
enum verdict {
    V_TCP = 0,
    V_PASS = 1,
    V_DNS_UDP = 4,
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
    flow->tuple.ipv4.saddr = ip.saddr;
    flow->tuple.ipv4.daddr = ip.daddr;
    if (ip.protocol == IPPROTO_UDP) {
        // A pod's DNS query; a fragment (the first one has the ports, the others do not) is
        // left alone, as UDP always was.
        if (!flow->from_pod || (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET)))
            return V_PASS;
        if (read_udp(skb, ETH_HLEN + ip.ihl * 4, flow) < 0)
            return V_PASS;
        return flow->dport == DNS_PORT ? V_DNS_UDP : V_PASS;
    }
    if (ip.protocol != IPPROTO_TCP)
        return V_PASS;
    if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
        return V_DROP_FRAGMENT;
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
        case IPPROTO_UDP:
            if (!flow->from_pod || read_udp(skb, off, flow) < 0)
                return V_PASS;
            return flow->dport == DNS_PORT ? V_DNS_UDP : V_PASS;
        // Transports we do not capture, and headers that end the chain for us.
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
    if (v == V_DNS_UDP) {
        // To ztunnel's DNS proxy when it runs and the pod did not opt out; else the query goes
        // where it was sent.
        if (dns_bypassed(&flow))
            return TC_ACT_OK;
        set_dport(&flow, bpf_htons(DNS_PROXY_PORT));
        struct bpf_sock *dns;
        if (flow.v6)
            dns = bpf_sk_lookup_udp(skb, &flow.tuple, sizeof(flow.tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
        else
            dns = bpf_sk_lookup_udp(skb, &flow.tuple, sizeof(flow.tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
        if (!dns)
            return TC_ACT_OK;
        if (assign(skb, dns, cfg->redirect_mark) != 0)
            return drop(STAT_ASSIGN_FAILED);
        count(STAT_OUTBOUND);
        return TC_ACT_OK;
    }
    if (v == V_DROP_FRAGMENT)
        return drop(STAT_FRAGMENT);
    if (v != V_TCP)
        return drop(STAT_UNPARSEABLE);
    // A port of an enrolled address left out of capture: every segment to it goes its way.
    if (!flow.from_pod && inbound_bypassed(flow.dport))
        return TC_ACT_OK;

    // A flow that already has its socket follows it.
    struct bpf_sock *sk = lookup(skb, &flow);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            // A new SYN meeting a TIME_WAIT socket of its 4-tuple: the kernel takes it as a new
            // connection through a listener lookup of its own, which ztunnel_listener answers
            // with ztunnel's listener. Without one (ztunnel down) that lookup could find a
            // host service listening on the original port: drop instead (fail closed).
            if (sk->state == BPF_TCP_TIME_WAIT && flow.syn && !flow.ack && !have_listener(skb, &flow, cfg)) {
                bpf_sk_release(sk);
                return drop(STAT_NO_LISTENER);
            }
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
    if (flow.from_pod && flow.dport == DNS_PORT && !dns_bypassed(&flow)) {
        // DNS over TCP: to the DNS proxy's listener when it runs, else the outbound one.
        struct flow d = flow;
        set_dport(&d, bpf_htons(DNS_PROXY_PORT));
        struct bpf_sock *dns = lookup(skb, &d);
        if (dns) {
            if (dns->state == BPF_TCP_LISTEN) {
                if (assign(skb, dns, cfg->redirect_mark) != 0)
                    return drop(STAT_ASSIGN_FAILED);
                count(STAT_OUTBOUND);
                return TC_ACT_OK;
            }
            bpf_sk_release(dns);
        }
    }
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

// A 4-byte load straight from the context (see ztunnel_listener).
#define READ_CTX(field) (*(volatile __u32 *)&(field))

SEC("sk_lookup")
int ztunnel_listener(struct bpf_sk_lookup *ctx) {
    if (READ_CTX(ctx->protocol) != IPPROTO_TCP)
        return SK_PASS;
    __u32 zero = 0;
    struct settings *cfg = bpf_map_lookup_elem(&settings, &zero);
    if (!cfg)
        return SK_PASS;
    // Every context field is read once, up front, with a load of its own: the verifier refuses
    // a context pointer the compiler moved (`ctx + off`) and dereferenced later.
    __u32 family = READ_CTX(ctx->family);
    __u32 local_port = READ_CTX(ctx->local_port);
    __u32 r4 = READ_CTX(ctx->remote_ip4), l4 = READ_CTX(ctx->local_ip4);
    __u32 r6[4], l6[4];
    r6[0] = READ_CTX(ctx->remote_ip6[0]);
    r6[1] = READ_CTX(ctx->remote_ip6[1]);
    r6[2] = READ_CTX(ctx->remote_ip6[2]);
    r6[3] = READ_CTX(ctx->remote_ip6[3]);
    l6[0] = READ_CTX(ctx->local_ip6[0]);
    l6[1] = READ_CTX(ctx->local_ip6[1]);
    l6[2] = READ_CTX(ctx->local_ip6[2]);
    l6[3] = READ_CTX(ctx->local_ip6[3]);
    struct addr remote = {}, local = {};
    __u32 v6 = 0;
    if (family == AF_INET) {
        remote.w[2] = bpf_htonl(0xffff);
        remote.w[3] = r4;
        local.w[2] = bpf_htonl(0xffff);
        local.w[3] = l4;
    } else if (family == AF_INET6) {
        __builtin_memcpy(remote.w, r6, sizeof(r6));
        __builtin_memcpy(local.w, l6, sizeof(l6));
        v6 = 1;
    } else {
        return SK_PASS;
    }
    // ztunnel_capture's own lookup of the DNS proxy's listener (which also comes through
    // here) must find that listener, not the outbound one.
    if (local_port == DNS_PROXY_PORT)
        return SK_PASS;
    // A host talking to itself (on a VM whose own address is enrolled: ztunnel delivering to
    // the application) must reach the socket it dialled. A pod never reaches itself through
    // the node, so this leaves pods' flows alone.
    if (remote.w[0] == local.w[0] && remote.w[1] == local.w[1] && remote.w[2] == local.w[2] &&
        remote.w[3] == local.w[3])
        return SK_PASS;
    // The same choice as ztunnel_capture's listener path.
    __u32 role;
    if (is_enrolled(&remote))
        role = ROLE_OUTBOUND;
    else if (is_enrolled(&local) && !inbound_bypassed(local_port))
        role = local_port == cfg->hbone_port ? ROLE_HBONE : ROLE_INBOUND;
    else
        return SK_PASS;
    __u32 key = role * 2 + v6;
    struct bpf_sock *sk = bpf_map_lookup_elem(&listeners, &key);
    if (!sk)
        return SK_PASS;  // no listener of ours: the ordinary lookup (and capture) decides
    bpf_sk_assign(ctx, sk, 0);
    bpf_sk_release(sk);
    return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
