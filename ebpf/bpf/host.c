// Capture of a host's own processes (a VM or ECS host where ztunnel runs beside the
// application, no pods): cgroup programs attached to the cgroup whose processes are the host's
// workload.
//
//   - connect4/connect6: a TCP connect() of such a process to anywhere but loopback is sent to
//     ztunnel's outbound listener on loopback (127.0.0.1 or ::1, port 15001), and its original
//     destination recorded under the socket's cookie. Connections of ztunnel's own cgroup, or
//     of sockets carrying ztunnel's mark, are left alone. A connect the program cannot record
//     (map full, no settings) is refused (EPERM): never passed uncaptured;
//   - sockops (TCP_CONNECT_CB, once the source port is chosen): the original destination is
//     filed again under the connection's source address and port, which is what ztunnel sees as
//     the peer of the connection it accepts; ztunnel reads it there;
//   - getpeername4/getpeername6: the application asking its socket's peer is told the original
//     destination, not ztunnel's listener;
//   - DNS (UDP or TCP to port 53, any server) goes to ztunnel's DNS proxy on loopback while one
//     is bound there (connect4/6 for connected sockets, sendmsg4/6 for datagrams sent with an
//     address; recvmsg4/6 report the answers as coming from the server asked). Without one,
//     queries go where they were sent.
//
// Other UDP is not captured (as for pods). Inbound to the host is the tc program of redirect.c on the
// host's interface, with the host's address enrolled.
//
// Maps are pinned by name beside redirect.c's, so they outlive the loader and a restarted
// ztunnel shares them with the programs still attached.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define DNS_PORT 53
#define AF_INET 2
#define AF_INET6 10

// Written by the loader as a [u32; 4] (src/host.rs).
struct host_settings {
    __u32 outbound_port;
    __u32 ztunnel_mark;
    __u32 dns_port;  // 0: DNS not captured
    __u32 pad;
};

// An address as redirect.c keys it: IPv6, or IPv4 mapped (::ffff:a.b.c.d); and a port in
// network order.
struct endpoint {
    __u32 w[4];
    __u32 port;
};

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct host_settings);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} host_settings SEC(".maps");

// The cgroups of ztunnel processes (cgroup id -> 1), left uncaptured. Each ztunnel adds its
// own before it makes any connection; a cgroup id is never reused, so an old entry is harmless.
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 64);
    __type(key, __u64);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} host_own_cgroups SEC(".maps");

// Socket cookie -> original destination.
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct endpoint);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} host_by_cookie SEC(".maps");

// Client source address and port (as ztunnel's accepted socket sees its peer) -> original
// destination.
struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct endpoint);
    __type(value, struct endpoint);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} host_orig_dst SEC(".maps");

// Indexes into host_stats; mirrors `HOST_STAT_NAMES` in src/host.rs.
enum host_stat {
    HS_CAPTURED = 0,
    HS_OWN = 1,
    HS_REFUSED = 2,
    HS_DNS = 3,
    HS_COUNT = 4,
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, HS_COUNT);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} host_stats SEC(".maps");

static __always_inline void count(__u32 which) {
    __u64 *n = bpf_map_lookup_elem(&host_stats, &which);
    if (n)
        *n += 1;
}

// A 4-byte load straight from the context.
#define READ_CTX(field) (*(volatile __u32 *)&(field))

// 0 (refused) or 1 (let through), as the kernel reads a cgroup program's verdict.
#define REFUSE 0
#define ALLOW 1

// The settings, or NULL when this connect belongs to ztunnel itself (or the settings are gone,
// in which case *refuse is set).
static __always_inline struct host_settings *capturing(struct bpf_sock_addr *ctx, int *refuse) {
    __u32 zero = 0;
    struct host_settings *cfg = bpf_map_lookup_elem(&host_settings, &zero);
    if (!cfg) {
        *refuse = 1;
        return 0;
    }
    __u64 cgroup = bpf_get_current_cgroup_id();
    if (bpf_map_lookup_elem(&host_own_cgroups, &cgroup)) {
        count(HS_OWN);
        return 0;
    }
    struct bpf_sock *sk = ctx->sk;
    if (sk && cfg->ztunnel_mark && sk->mark == cfg->ztunnel_mark) {
        count(HS_OWN);
        return 0;
    }
    return cfg;
}

// Records `orig` for this socket; 0 on success.
static __always_inline int record(struct bpf_sock_addr *ctx, struct endpoint *orig) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    return (int)bpf_map_update_elem(&host_by_cookie, &cookie, orig, BPF_ANY);
}

// Where a captured connect or datagram goes: ztunnel's outbound listener, or its DNS proxy.
enum target {
    T_NONE = 0,
    T_OUTBOUND = 1,
    T_DNS = 2,
    T_REFUSE = 3,
};

// Whether ztunnel has a socket of `type` bound at loopback:`port` (IPv4 loopback unless `v6`):
// one carrying ztunnel's mark, which an unprivileged process cannot set, so that a process
// squatting the port while ztunnel is down is never handed the host's traffic.
static __always_inline int ztunnel_bound(struct bpf_sock_addr *ctx, struct host_settings *cfg, __u32 type,
                                         __u32 port, int v6) {
    struct bpf_sock_tuple t = {};
    struct bpf_sock *sk;
    if (v6) {
        t.ipv6.daddr[3] = bpf_htonl(1);
        t.ipv6.saddr[3] = bpf_htonl(1);
        t.ipv6.dport = bpf_htons((__u16)port);
        if (type == SOCK_STREAM)
            sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
        else
            sk = bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
    } else {
        t.ipv4.daddr = bpf_htonl(0x7f000001);
        t.ipv4.saddr = bpf_htonl(0x7f000001);
        t.ipv4.dport = bpf_htons((__u16)port);
        if (type == SOCK_STREAM)
            sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
        else
            sk = bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    }
    if (!sk)
        return 0;
    int ours = sk->mark == cfg->ztunnel_mark;
    bpf_sk_release(sk);
    return ours;
}

// Where a socket of `type` sending to port `dport` (host order) goes, for a process of the
// host (`cfg`): TCP to the outbound listener, DNS (TCP or UDP to 53) to the DNS proxy while it
// runs (else where it was sent, as for pods), other UDP nowhere (not captured). TCP while no
// ztunnel listener is there: T_REFUSE.
static __always_inline int target_of(struct bpf_sock_addr *ctx, struct host_settings *cfg, __u32 type,
                                     __u16 dport, int v6) {
    if (dport == DNS_PORT && cfg->dns_port && ztunnel_bound(ctx, cfg, type, cfg->dns_port, v6))
        return T_DNS;
    if (type != SOCK_STREAM)
        return T_NONE;
    return ztunnel_bound(ctx, cfg, type, cfg->outbound_port, v6) ? T_OUTBOUND : T_REFUSE;
}

// Only TCP, and UDP to the DNS port, are ever captured.
static __always_inline int candidate(__u32 type, __u16 dport) {
    return type == SOCK_STREAM || (type == SOCK_DGRAM && dport == DNS_PORT);
}

// Records the IPv4 destination and sends the socket to loopback; the verdict.
static __always_inline int redirect4(struct bpf_sock_addr *ctx) {
    __u32 type = ctx->type;
    __u16 dport = bpf_ntohs((__u16)ctx->user_port);
    if (!candidate(type, dport))
        return ALLOW;
    __u32 dst = ctx->user_ip4;
    // Loopback (and the unspecified address, which means this host) stays local; link-local
    // (169.254/16: the cloud's metadata and credentials endpoints) is never a mesh destination.
    if ((bpf_ntohl(dst) >> 24) == 127 || dst == 0 || (bpf_ntohl(dst) >> 16) == 0xa9fe)
        return ALLOW;
    int refuse = 0;
    struct host_settings *cfg = capturing(ctx, &refuse);
    if (!cfg) {
        // No settings: TCP is refused rather than passed; UDP goes its way, as UDP always does.
        if (refuse && type == SOCK_STREAM) {
            count(HS_REFUSED);
            return REFUSE;
        }
        return ALLOW;
    }
    int target = target_of(ctx, cfg, type, dport, 0);
    if (target == T_NONE)
        return ALLOW;
    if (target == T_REFUSE) {
        count(HS_REFUSED);
        return REFUSE;
    }
    struct endpoint orig = {.w = {0, 0, bpf_htonl(0xffff), dst}, .port = ctx->user_port};
    if (record(ctx, &orig) != 0) {
        count(HS_REFUSED);
        return type == SOCK_STREAM ? REFUSE : ALLOW;
    }
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons((__u16)(target == T_DNS ? cfg->dns_port : cfg->outbound_port));
    count(target == T_DNS ? HS_DNS : HS_CAPTURED);
    return ALLOW;
}

// The same for an IPv6 socket (an IPv4-mapped destination goes to the IPv4 loopback).
static __always_inline int redirect6(struct bpf_sock_addr *ctx) {
    __u32 type = ctx->type;
    __u16 dport = bpf_ntohs((__u16)ctx->user_port);
    if (!candidate(type, dport))
        return ALLOW;
    struct endpoint orig = {.port = ctx->user_port};
    orig.w[0] = READ_CTX(ctx->user_ip6[0]);
    orig.w[1] = READ_CTX(ctx->user_ip6[1]);
    orig.w[2] = READ_CTX(ctx->user_ip6[2]);
    orig.w[3] = READ_CTX(ctx->user_ip6[3]);
    int mapped = orig.w[0] == 0 && orig.w[1] == 0 && orig.w[2] == bpf_htonl(0xffff);
    int zero_prefix = orig.w[0] == 0 && orig.w[1] == 0 && orig.w[2] == 0;
    // ::1, ::, and IPv4-mapped loopback or unspecified stay local.
    if (zero_prefix && (orig.w[3] == 0 || orig.w[3] == bpf_htonl(1)))
        return ALLOW;
    if (mapped && ((bpf_ntohl(orig.w[3]) >> 24) == 127 || orig.w[3] == 0 ||
                   (bpf_ntohl(orig.w[3]) >> 16) == 0xa9fe))
        return ALLOW;
    // Link-local (fe80::/10).
    if ((bpf_ntohl(orig.w[0]) & 0xffc00000) == 0xfe800000)
        return ALLOW;
    int refuse = 0;
    struct host_settings *cfg = capturing(ctx, &refuse);
    if (!cfg) {
        if (refuse && type == SOCK_STREAM) {
            count(HS_REFUSED);
            return REFUSE;
        }
        return ALLOW;
    }
    int target = target_of(ctx, cfg, type, dport, !mapped);
    if (target == T_NONE)
        return ALLOW;
    if (target == T_REFUSE) {
        count(HS_REFUSED);
        return REFUSE;
    }
    if (record(ctx, &orig) != 0) {
        count(HS_REFUSED);
        return type == SOCK_STREAM ? REFUSE : ALLOW;
    }
    if (mapped) {
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    ctx->user_port = bpf_htons((__u16)(target == T_DNS ? cfg->dns_port : cfg->outbound_port));
    count(target == T_DNS ? HS_DNS : HS_CAPTURED);
    return ALLOW;
}

SEC("cgroup/connect4")
int host_connect4(struct bpf_sock_addr *ctx) {
    return redirect4(ctx);
}

SEC("cgroup/connect6")
int host_connect6(struct bpf_sock_addr *ctx) {
    return redirect6(ctx);
}

// Datagrams sent with an address (unconnected UDP): DNS queries to the DNS proxy.
SEC("cgroup/sendmsg4")
int host_sendmsg4(struct bpf_sock_addr *ctx) {
    return redirect4(ctx);
}

SEC("cgroup/sendmsg6")
int host_sendmsg6(struct bpf_sock_addr *ctx) {
    return redirect6(ctx);
}

// The DNS proxy's answers are reported as coming from the server the query was sent to.
SEC("cgroup/recvmsg4")
int host_recvmsg4(struct bpf_sock_addr *ctx) {
    __u32 zero = 0;
    struct host_settings *cfg = bpf_map_lookup_elem(&host_settings, &zero);
    if (!cfg || !cfg->dns_port)
        return 1;
    if (ctx->user_ip4 != bpf_htonl(0x7f000001) || bpf_ntohs((__u16)ctx->user_port) != cfg->dns_port)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct endpoint *orig = bpf_map_lookup_elem(&host_by_cookie, &cookie);
    if (orig) {
        ctx->user_ip4 = orig->w[3];
        ctx->user_port = orig->port;
    }
    return 1;
}

SEC("cgroup/recvmsg6")
int host_recvmsg6(struct bpf_sock_addr *ctx) {
    __u32 zero = 0;
    struct host_settings *cfg = bpf_map_lookup_elem(&host_settings, &zero);
    if (!cfg || !cfg->dns_port || bpf_ntohs((__u16)ctx->user_port) != cfg->dns_port)
        return 1;
    __u32 w0 = READ_CTX(ctx->user_ip6[0]);
    __u32 w1 = READ_CTX(ctx->user_ip6[1]);
    __u32 w2 = READ_CTX(ctx->user_ip6[2]);
    __u32 w3 = READ_CTX(ctx->user_ip6[3]);
    int loopback = w0 == 0 && w1 == 0 &&
                   ((w2 == 0 && w3 == bpf_htonl(1)) || (w2 == bpf_htonl(0xffff) && w3 == bpf_htonl(0x7f000001)));
    if (!loopback)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct endpoint *orig = bpf_map_lookup_elem(&host_by_cookie, &cookie);
    if (orig) {
        ctx->user_ip6[0] = orig->w[0];
        ctx->user_ip6[1] = orig->w[1];
        ctx->user_ip6[2] = orig->w[2];
        ctx->user_ip6[3] = orig->w[3];
        ctx->user_port = orig->port;
    }
    return 1;
}

SEC("sockops")
int host_sockops_connect(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
        return 1;
    __u32 zero = 0;
    struct host_settings *cfg = bpf_map_lookup_elem(&host_settings, &zero);
    // Only connections sent to the outbound listener are filed (not DNS over TCP to the proxy).
    if (!cfg || bpf_ntohl(READ_CTX(skops->remote_port)) != cfg->outbound_port)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    struct endpoint *orig = bpf_map_lookup_elem(&host_by_cookie, &cookie);
    if (!orig)
        return 1;
    // Each context field read with a load of its own (the verifier refuses a context pointer
    // the compiler offset and dereferenced later).
    __u32 family = READ_CTX(skops->family);
    __u32 local_port = READ_CTX(skops->local_port);
    __u32 l4 = READ_CTX(skops->local_ip4);
    __u32 l6[4];
    l6[0] = READ_CTX(skops->local_ip6[0]);
    l6[1] = READ_CTX(skops->local_ip6[1]);
    l6[2] = READ_CTX(skops->local_ip6[2]);
    l6[3] = READ_CTX(skops->local_ip6[3]);
    struct endpoint key = {.port = bpf_htons((__u16)local_port)};
    if (family == AF_INET) {
        key.w[2] = bpf_htonl(0xffff);
        key.w[3] = l4;
    } else {
        __builtin_memcpy(key.w, l6, sizeof(l6));
    }
    struct endpoint copy = *orig;
    bpf_map_update_elem(&host_orig_dst, &key, &copy, BPF_ANY);
    return 1;
}

SEC("cgroup/getpeername4")
int host_getpeername4(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct endpoint *orig = bpf_map_lookup_elem(&host_by_cookie, &cookie);
    if (orig) {
        ctx->user_ip4 = orig->w[3];
        ctx->user_port = orig->port;
    }
    return ALLOW;
}

SEC("cgroup/getpeername6")
int host_getpeername6(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct endpoint *orig = bpf_map_lookup_elem(&host_by_cookie, &cookie);
    if (orig) {
        ctx->user_ip6[0] = orig->w[0];
        ctx->user_ip6[1] = orig->w[1];
        ctx->user_ip6[2] = orig->w[2];
        ctx->user_ip6[3] = orig->w[3];
        ctx->user_port = orig->port;
    }
    return ALLOW;
}

// Stream transports the connect programs cannot see (SCTP and DCCP connect without the hook
// TCP runs): the host's processes may not open them, as they would leave uncaptured.
#define IPPROTO_DCCP_ 33
#define IPPROTO_SCTP_ 132

SEC("cgroup/sock_create")
int host_sock_create(struct bpf_sock *sk) {
    if (sk->family != AF_INET && sk->family != AF_INET6)
        return ALLOW;
    if (sk->protocol == IPPROTO_SCTP_ || sk->protocol == IPPROTO_DCCP_) {
        __u32 zero = 0;
        struct host_settings *cfg = bpf_map_lookup_elem(&host_settings, &zero);
        __u64 cgroup = bpf_get_current_cgroup_id();
        if (cfg && bpf_map_lookup_elem(&host_own_cgroups, &cgroup))
            return ALLOW;
        count(HS_REFUSED);
        return REFUSE;
    }
    return ALLOW;
}

char _license[] SEC("license") = "Dual MIT/GPL";
