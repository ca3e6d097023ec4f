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
//     destination, not ztunnel's listener.
//
// UDP is not captured (as for pods). Inbound to the host is the tc program of redirect.c on the
// host's interface, with the host's address enrolled.
//
// Maps are pinned by name beside redirect.c's, so they outlive the loader and a restarted
// ztunnel shares them with the programs still attached.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define SOCK_STREAM 1
#define AF_INET 2
#define AF_INET6 10

// Written by the loader as a [u32; 4] (src/host.rs, `HostSettings::to_words`).
struct host_settings {
    __u32 outbound_port;
    __u32 ztunnel_mark;
    __u64 ztunnel_cgroup;
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
    HS_COUNT = 3,
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
    if (cfg->ztunnel_cgroup && bpf_get_current_cgroup_id() == cfg->ztunnel_cgroup) {
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

SEC("cgroup/connect4")
int host_connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type != SOCK_STREAM)
        return ALLOW;
    __u32 dst = ctx->user_ip4;
    // Loopback (and the unspecified address, which means this host) stays local.
    if ((bpf_ntohl(dst) >> 24) == 127 || dst == 0)
        return ALLOW;
    int refuse = 0;
    struct host_settings *cfg = capturing(ctx, &refuse);
    if (!cfg) {
        if (refuse)
            count(HS_REFUSED);
        return refuse ? REFUSE : ALLOW;
    }
    struct endpoint orig = {.w = {0, 0, bpf_htonl(0xffff), dst}, .port = ctx->user_port};
    if (record(ctx, &orig) != 0) {
        count(HS_REFUSED);
        return REFUSE;
    }
    ctx->user_ip4 = bpf_htonl(0x7f000001);
    ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
    count(HS_CAPTURED);
    return ALLOW;
}

SEC("cgroup/connect6")
int host_connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type != SOCK_STREAM)
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
    if (mapped && ((bpf_ntohl(orig.w[3]) >> 24) == 127 || orig.w[3] == 0))
        return ALLOW;
    int refuse = 0;
    struct host_settings *cfg = capturing(ctx, &refuse);
    if (!cfg) {
        if (refuse)
            count(HS_REFUSED);
        return refuse ? REFUSE : ALLOW;
    }
    if (record(ctx, &orig) != 0) {
        count(HS_REFUSED);
        return REFUSE;
    }
    if (mapped) {
        // An IPv4 destination dialled from a dual-stack socket: to the IPv4 loopback.
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);
    } else {
        ctx->user_ip6[0] = 0;
        ctx->user_ip6[1] = 0;
        ctx->user_ip6[2] = 0;
        ctx->user_ip6[3] = bpf_htonl(1);
    }
    ctx->user_port = bpf_htons((__u16)cfg->outbound_port);
    count(HS_CAPTURED);
    return ALLOW;
}

SEC("sockops")
int host_sockops_connect(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
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

char _license[] SEC("license") = "Dual MIT/GPL";
