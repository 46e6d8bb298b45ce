/* The upstream of bench/dataplane.py: a tiny keep-alive HTTP/1.1 server that answers every request
 * with "Hello, world\n", and a WebSocket echo on /ws. Built `gcc -O2 -static` into an image FROM
 * scratch, so that the benchmark measures the proxies in front of it, not the server.
 *
 * One thread, epoll (level-triggered), non-blocking sockets. HTTP/1.1: keep-alive and pipelining,
 * request bodies by Content-Length or chunked (read and discarded, then answered; 100-continue),
 * HEAD, `Connection: close`, HTTP/1.0 (closes unless keep-alive). WebSocket (RFC 6455) on GET /ws:
 * text, binary and continuation frames come back unmasked with the same opcode and FIN bit (any
 * size: payloads stream through), ping → pong, close → close, then the connection ends.
 * Backpressure: a connection with more than OUT_LIMIT bytes unsent is not read until they leave.
 * Listens on 0.0.0.0:$PORT (Portside sets PORT), 8080 by default; SIGTERM ends it (it is PID 1).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define IN_SIZE 65536           /* a request head must fit; bodies and frames stream through */
#define OUT_LIMIT (256 * 1024)  /* stop reading a connection with this much unsent */
#define MAX_EVENTS 256

static const char HELLO[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world\n";
static const char HELLO_HEAD_ONLY[] =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n";
static const char BAD_REQUEST[] =
    "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
static const char TOO_LARGE[] =
    "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
static const char WS_GUID[] = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

enum state { HEAD, BODY_LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_TRAILER, WS_FRAME, WS_PAYLOAD };

struct conn {
    int fd;
    uint32_t events;  /* what epoll watches now */
    enum state state;
    char in[IN_SIZE];
    size_t in_off, in_len; /* unconsumed input is in[in_off, in_len) */
    char *out;
    size_t out_off, out_len, out_cap;
    uint64_t left;         /* body bytes (BODY_LENGTH, CHUNK_DATA) or frame payload still to come */
    int head_only;         /* the request in progress is HEAD */
    int keep_alive;        /* keep the connection after the request in progress */
    int upgrade;           /* answer the request in progress with a WebSocket handshake */
    char ws_key[64];
    uint8_t mask[4];
    int masked;
    uint64_t mask_pos;
    int closing; /* close once `out` is sent; read nothing more */
};

static int epfd;

/* ---- SHA-1 (FIPS 180-1) and base64, for Sec-WebSocket-Accept ------------------------------ */

struct sha1 {
    uint32_t h[5];
    uint64_t length; /* bytes */
    uint8_t block[64];
    size_t used;
};

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(struct sha1 *s, const uint8_t *p) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        uint32_t t = rol(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol(b, 30);
        b = a;
        a = t;
    }
    s->h[0] += a;
    s->h[1] += b;
    s->h[2] += c;
    s->h[3] += d;
    s->h[4] += e;
}

static void sha1_init(struct sha1 *s) {
    static const uint32_t h0[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    memcpy(s->h, h0, sizeof h0);
    s->length = 0;
    s->used = 0;
}

static void sha1_update(struct sha1 *s, const void *data, size_t n) {
    const uint8_t *p = data;
    s->length += n;
    while (n > 0) {
        size_t take = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->block + s->used, p, take);
        s->used += take;
        p += take;
        n -= take;
        if (s->used == 64) {
            sha1_block(s, s->block);
            s->used = 0;
        }
    }
}

static void sha1_final(struct sha1 *s, uint8_t digest[20]) {
    uint64_t bits = s->length * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    sha1_update(s, &pad, 1);
    while (s->used != 56) sha1_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(s, len, 8);
    for (int i = 0; i < 20; i++) digest[i] = (uint8_t)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *in, size_t n, char *out) {
    static const char abc[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = abc[(v >> 6) & 63];
        *out++ = abc[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        *out++ = abc[v >> 18];
        *out++ = abc[(v >> 12) & 63];
        *out++ = i + 1 < n ? abc[(v >> 6) & 63] : '=';
        *out++ = '=';
    }
    *out = 0;
}

/* ---- connections ------------------------------------------------------------------------- */

static void out_append(struct conn *c, const void *data, size_t n) {
    if (c->out_len + n > c->out_cap) {
        if (c->out_off > 0) { /* reclaim what was sent before growing */
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n) cap *= 2;
        if (cap != c->out_cap) {
            char *grown = realloc(c->out, cap);
            if (!grown) abort();
            c->out = grown;
            c->out_cap = cap;
        }
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

static size_t unsent(const struct conn *c) { return c->out_len - c->out_off; }

static void close_conn(struct conn *c) {
    close(c->fd); /* also removes it from the epoll set */
    free(c->out);
    free(c);
}

/* The value of a header line "Name: value" if `line` (without CRLF, `n` bytes) is `name`. */
static const char *header_value(const char *line, size_t n, const char *name, size_t *value_len) {
    size_t k = strlen(name);
    if (n <= k || line[k] != ':' || strncasecmp(line, name, k) != 0) return NULL;
    const char *v = line + k + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
    *value_len = (size_t)(end - v);
    return v;
}

static int has_token(const char *v, size_t n, const char *token) {
    char tmp[256];
    if (n >= sizeof tmp) n = sizeof tmp - 1;
    memcpy(tmp, v, n);
    tmp[n] = 0;
    return strcasestr(tmp, token) != NULL;
}

static void answer(struct conn *c) {
    if (c->upgrade) {
        char accept[32], response[256];
        uint8_t digest[20];
        struct sha1 s;
        sha1_init(&s);
        sha1_update(&s, c->ws_key, strlen(c->ws_key));
        sha1_update(&s, WS_GUID, sizeof WS_GUID - 1);
        sha1_final(&s, digest);
        base64(digest, 20, accept);
        int n = snprintf(response, sizeof response,
                         "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                         accept);
        out_append(c, response, (size_t)n);
        c->state = WS_FRAME;
        return;
    }
    if (c->head_only)
        out_append(c, HELLO_HEAD_ONLY, sizeof HELLO_HEAD_ONLY - 1);
    else
        out_append(c, HELLO, sizeof HELLO - 1);
    if (!c->keep_alive) c->closing = 1;
    c->state = HEAD;
}

static void refuse(struct conn *c, const char *response, size_t n) {
    out_append(c, response, n);
    c->closing = 1;
}

/* Parse one request head from the input; 0 if it is not complete yet. */
static int parse_head(struct conn *c) {
    char *start = c->in + c->in_off;
    size_t avail = c->in_len - c->in_off;
    char *end = memmem(start, avail, "\r\n\r\n", 4);
    if (!end) {
        if (c->in_off == 0 && c->in_len == IN_SIZE) refuse(c, TOO_LARGE, sizeof TOO_LARGE - 1);
        return 0;
    }
    size_t head_len = (size_t)(end - start) + 4;
    char *line_end = memmem(start, head_len, "\r\n", 2);
    /* request line: METHOD SP TARGET SP HTTP/1.x */
    char *sp1 = memchr(start, ' ', (size_t)(line_end - start));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (!sp1 || !sp2 || line_end - sp2 - 1 != 8 || strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        refuse(c, BAD_REQUEST, sizeof BAD_REQUEST - 1);
        return 0;
    }
    int http10 = sp2[8] == '0';
    c->head_only = sp1 - start == 4 && memcmp(start, "HEAD", 4) == 0;
    int get = sp1 - start == 3 && memcmp(start, "GET", 3) == 0;
    size_t target_len = (size_t)(sp2 - sp1 - 1);
    int ws_path = (target_len == 3 && memcmp(sp1 + 1, "/ws", 3) == 0) ||
                  (target_len > 3 && memcmp(sp1 + 1, "/ws", 3) == 0 && (sp1[4] == '?'));
    int conn_close = 0, conn_keep = 0, conn_upgrade = 0, upgrade_ws = 0, chunked = 0;
    int expect_continue = 0;
    uint64_t length = 0;
    c->ws_key[0] = 0;
    for (char *line = line_end + 2; line < end + 2;) {
        char *eol = memmem(line, (size_t)(end + 2 - line), "\r\n", 2);
        size_t n = (size_t)(eol - line), vn;
        const char *v;
        if ((v = header_value(line, n, "Content-Length", &vn))) {
            char *stop;
            char tmp[32];
            if (vn == 0 || vn >= sizeof tmp) {
                refuse(c, BAD_REQUEST, sizeof BAD_REQUEST - 1);
                return 0;
            }
            memcpy(tmp, v, vn);
            tmp[vn] = 0;
            length = strtoull(tmp, &stop, 10);
            if (*stop) {
                refuse(c, BAD_REQUEST, sizeof BAD_REQUEST - 1);
                return 0;
            }
        } else if ((v = header_value(line, n, "Transfer-Encoding", &vn))) {
            chunked = has_token(v, vn, "chunked");
        } else if ((v = header_value(line, n, "Connection", &vn))) {
            conn_close |= has_token(v, vn, "close");
            conn_keep |= has_token(v, vn, "keep-alive");
            conn_upgrade |= has_token(v, vn, "upgrade");
        } else if ((v = header_value(line, n, "Expect", &vn))) {
            expect_continue = has_token(v, vn, "100-continue");
        } else if ((v = header_value(line, n, "Upgrade", &vn))) {
            upgrade_ws = has_token(v, vn, "websocket");
        } else if ((v = header_value(line, n, "Sec-WebSocket-Key", &vn))) {
            if (vn < sizeof c->ws_key) {
                memcpy(c->ws_key, v, vn);
                c->ws_key[vn] = 0;
            }
        }
        line = eol + 2;
    }
    c->in_off += head_len;
    c->keep_alive = !conn_close && (!http10 || conn_keep);
    c->upgrade = get && ws_path && conn_upgrade && upgrade_ws && c->ws_key[0];
    if (expect_continue && (chunked || length > 0))
        out_append(c, "HTTP/1.1 100 Continue\r\n\r\n", 25);
    if (chunked) {
        c->state = CHUNK_SIZE;
    } else if (length > 0) {
        c->state = BODY_LENGTH;
        c->left = length;
    } else {
        answer(c);
    }
    return 1;
}

/* Advance the chunked body by one step; 0 if that needs more input. */
static int parse_chunked(struct conn *c) {
    char *start = c->in + c->in_off;
    size_t avail = c->in_len - c->in_off;
    if (c->state == CHUNK_DATA) { /* chunk data and its CRLF */
        size_t take = avail < c->left ? avail : (size_t)c->left;
        c->in_off += take;
        c->left -= take;
        if (c->left == 0) c->state = CHUNK_SIZE;
        return take > 0;
    }
    char *eol = memmem(start, avail, "\r\n", 2);
    if (!eol) {
        if (c->in_off == 0 && c->in_len == IN_SIZE) refuse(c, TOO_LARGE, sizeof TOO_LARGE - 1);
        return 0;
    }
    size_t line_len = (size_t)(eol - start);
    c->in_off += line_len + 2;
    if (c->state == CHUNK_TRAILER) {
        if (line_len == 0) answer(c); /* the empty line ends the trailers */
        return 1;
    }
    char *stop;
    uint64_t size = strtoull(start, &stop, 16); /* stops at ';' (extensions) or CR */
    if (stop == start) {
        refuse(c, BAD_REQUEST, sizeof BAD_REQUEST - 1);
        return 0;
    }
    if (size == 0) {
        c->state = CHUNK_TRAILER;
    } else {
        c->state = CHUNK_DATA;
        c->left = size + 2;
    }
    return 1;
}

/* Echo one WebSocket frame header, or stream part of a payload; 0 if that needs more input. */
static int ws_step(struct conn *c) {
    uint8_t *p = (uint8_t *)c->in + c->in_off;
    size_t avail = c->in_len - c->in_off;
    if (c->state == WS_PAYLOAD) {
        size_t take = avail < c->left ? avail : (size_t)c->left;
        if (take == 0) return 0;
        if (c->masked)
            for (size_t i = 0; i < take; i++) p[i] ^= c->mask[(c->mask_pos + i) & 3];
        c->mask_pos += take;
        out_append(c, p, take);
        c->in_off += take;
        c->left -= take;
        if (c->left == 0) c->state = WS_FRAME;
        return 1;
    }
    if (avail < 2) return 0;
    int opcode = p[0] & 0x0F, masked = p[1] >> 7;
    uint64_t len = p[1] & 0x7F;
    size_t header = 2;
    if (len == 126) {
        if (avail < 4) return 0;
        len = (uint64_t)p[2] << 8 | p[3];
        header = 4;
    } else if (len == 127) {
        if (avail < 10) return 0;
        len = 0;
        for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
        header = 10;
    }
    if (masked) {
        if (avail < header + 4) return 0;
        memcpy(c->mask, p + header, 4);
        header += 4;
    }
    if (opcode >= 8) { /* control frames: at most 125 bytes, answered whole */
        if (avail < header + len) return 0;
        uint8_t frame[2 + 125];
        uint8_t *payload = p + header;
        if (len > 125) {
            c->closing = 1;
            return 0;
        }
        for (size_t i = 0; i < len; i++) frame[2 + i] = payload[i] ^ (masked ? c->mask[i & 3] : 0);
        c->in_off += header + len;
        if (opcode == 0xA) return 1; /* pong: nothing to answer */
        frame[0] = (uint8_t)(0x80 | (opcode == 0x9 ? 0xA : opcode));
        frame[1] = (uint8_t)len;
        out_append(c, frame, 2 + len);
        if (opcode == 0x8) c->closing = 1;
        return 1;
    }
    uint8_t echo[10];
    size_t echo_len = 2;
    echo[0] = p[0];
    if (len < 126) {
        echo[1] = (uint8_t)len;
    } else if (len < 65536) {
        echo[1] = 126;
        echo[2] = (uint8_t)(len >> 8);
        echo[3] = (uint8_t)len;
        echo_len = 4;
    } else {
        echo[1] = 127;
        for (int i = 0; i < 8; i++) echo[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        echo_len = 10;
    }
    out_append(c, echo, echo_len);
    c->in_off += header;
    c->masked = masked;
    c->mask_pos = 0;
    c->left = len;
    if (len > 0) c->state = WS_PAYLOAD;
    return 1;
}

/* Consume what the input holds, as long as the output is not backed up. */
static void process(struct conn *c) {
    while (!c->closing && unsent(c) < OUT_LIMIT && c->in_off < c->in_len) {
        int progressed;
        switch (c->state) {
        case HEAD:
            progressed = parse_head(c);
            break;
        case BODY_LENGTH: {
            size_t avail = c->in_len - c->in_off;
            size_t take = avail < c->left ? avail : (size_t)c->left;
            c->in_off += take;
            c->left -= take;
            if (c->left == 0) answer(c);
            progressed = 1;
            break;
        }
        case CHUNK_SIZE:
        case CHUNK_DATA:
        case CHUNK_TRAILER:
            progressed = parse_chunked(c);
            break;
        default:
            progressed = ws_step(c);
        }
        if (!progressed) break;
    }
    if (c->in_off > 0) { /* keep the unconsumed rest at the start of the buffer */
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
}

/* Send what is pending; -1 when the connection failed. */
static int flush(struct conn *c) {
    while (unsent(c) > 0) {
        ssize_t n = send(c->fd, c->out + c->out_off, unsent(c), MSG_NOSIGNAL);
        if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -1;
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    return 0;
}

/* Read (if asked), answer, send, and watch for what the connection waits for next. */
static void serve(struct conn *c, int readable) {
    if (readable && !c->closing && c->in_len < IN_SIZE) {
        ssize_t n = recv(c->fd, c->in + c->in_len, IN_SIZE - c->in_len, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
            close_conn(c);
            return;
        }
        if (n > 0) c->in_len += (size_t)n;
    }
    for (;;) {
        size_t before = c->in_len;
        process(c);
        if (flush(c) < 0) {
            close_conn(c);
            return;
        }
        /* input left behind by backpressure can be processed now that the output drained */
        if (c->in_len == before || unsent(c) > 0 || c->closing) break;
    }
    if (c->closing && unsent(c) == 0) {
        close_conn(c);
        return;
    }
    uint32_t want = 0;
    if (!c->closing && unsent(c) < OUT_LIMIT && c->in_len < IN_SIZE) want |= EPOLLIN;
    if (unsent(c) > 0) want |= EPOLLOUT;
    if (want != c->events) {
        struct epoll_event ev = {.events = want, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
        c->events = want;
    }
}

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

int main(void) {
    const char *port_env = getenv("PORT");
    int port = port_env ? atoi(port_env) : 8080;
    signal(SIGTERM, stop);
    signal(SIGINT, stop);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        perror("listen");
        return 1;
    }
    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);
    fprintf(stderr, "upstream: listening on 0.0.0.0:%d\n", port);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) { /* the listening socket */
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c) abort();
                    c->fd = fd;
                    c->events = EPOLLIN;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (events[i].events & (EPOLLERR | EPOLLHUP) && !(events[i].events & EPOLLIN)) {
                close_conn(c);
                continue;
            }
            serve(c, (events[i].events & EPOLLIN) != 0);
        }
    }
}
