# The images cri-tools' critest (v1.34) pulls, built offline with the same behaviour as upstream's, so
# the whole suite runs against a local registry that containerd mirrors gcr.io and registry.k8s.io to.
# Sourced by scripts/build-test-images.sh (`--only critest`); uses its busybox_rootfs and lib/oci.sh.
# shellcheck shell=bash
#
# All are built on a busybox like upstream's: applets are hard links (masking /bin/ls must not mask the
# shell), with stand-ins for the two applets Debian's busybox-static lacks and critest runs (pgrep, ipcs).
# Upstream (cri-tools images/, kubernetes test/images/) → here:
#   e2e-test-images/busybox:1.29-2: that busybox (the default build pushes our symlinked one under this
#       name for the test command's quick conformance run; this one replaces it).
#   k8s-staging-cri-tools/test-image-{latest,tag:test,tag:all,1,2,3,tags:1..3}: busybox + a file named after
#       the image (ADD ${TEST} ${TEST}); tags:1..3 are one image, 1..3 three different ones.
#   k8s-staging-cri-tools/test-image-user-{uid,username,uid-group,username-group}: USER 1002, www-data,
#       1003:1003, www-data:www-data.
#   k8s-staging-cri-tools/test-image-predefined-group: user 1000 (default-user) in group 50000, USER 1000.
#   k8s-staging-cri-tools/hostnet-nginx-amd64: a web server on :12003 (host network specs).
#   e2e-test-images/nginx:1.14-2: a web server on :80 whose main process is named nginx, has
#       "master process" in its command line (as nginx's title) and writes /var/run/nginx.pid (the PID
#       namespace specs read all three).
#   e2e-test-images/httpd:2.4.39-4: a web server on :80 that logs "httpd".
#   e2e-test-images/nonewprivs:1.3: a setuid-root binary printing "Effective uid: N" (integration/src/bin/nnp.rs).
# Not buildable: test-image-digest@sha256:9700f9… (a digest of upstream's bytes); its spec fails offline for
# every runtime alike.

CRITEST_IMAGES_SCRIPT="${BASH_SOURCE[0]}"

# critest_busybox_rootfs DIR: busybox_rootfs with hard links for applets, www-data, pgrep and ipcs.
critest_busybox_rootfs() {
    local rootfs=$1 link
    busybox_rootfs "$rootfs"
    while IFS= read -r link; do
        ln -f "$rootfs/bin/busybox" "$link"
    done < <(find "$rootfs" -type l -lname /bin/busybox)
    # busybox's own image has www-data (uid/gid 33) as upstream's user images rely on.
    echo 'www-data:x:33:33:www-data:/var/www:/bin/false' >>"$rootfs/etc/passwd"
    echo 'www-data:x:33:' >>"$rootfs/etc/group"
    # pgrep NAME: the pids whose command name is NAME (what critest's exec checks ask).
    cat >"$rootfs/usr/bin/pgrep" <<'EOF'
#!/bin/sh
found=1
for dir in /proc/[0-9]*; do
    [ "$(cat "$dir/comm" 2>/dev/null)" = "$1" ] && echo "${dir#/proc/}" && found=0
done
exit $found
EOF
    # ipcs -m: the shared memory segments of the IPC namespace, util-linux's columns.
    cat >"$rootfs/usr/bin/ipcs" <<'EOF'
#!/bin/sh
echo "------ Shared Memory Segments --------"
echo "key        shmid      owner      perms      bytes      nattch     status"
tail -n +2 /proc/sysvipc/shm 2>/dev/null | while read -r key shmid perms size cpid lpid nattch uid rest; do
    printf '0x%08x %-10s %-10s %-10s %-10s %-10s\n' "$key" "$shmid" "$uid" "$perms" "$size" "$nattch"
done
EOF
    chmod 0755 "$rootfs/usr/bin/pgrep" "$rootfs/usr/bin/ipcs"
}

critest_recipe() {
    echo "critest v2 $(cat "$CRITEST_IMAGES_SCRIPT" "$SPRY_ROOT/integration/src/bin/nnp.rs" | sha256sum | cut -c1-16) $BUSYBOX_RECIPE"
}

# critest_web_server ROOTFS NAME PORT: /usr/sbin/NAME, a script that serves /usr/share/NAME/html on PORT
# with busybox httpd, writes its own pid to /var/run/NAME.pid and stays the main process (so `pidof NAME`
# finds that pid), says NAME on stderr, and ends the server on SIGTERM. Its arguments are ignored: the
# images pass nginx's process title as one, so that the command line reads like nginx's.
critest_web_server() {
    local rootfs=$1 name=$2 port=$3
    mkdir -p "$rootfs/usr/share/$name/html" "$rootfs/var/run"
    printf '<html><body><h1>Welcome to %s!</h1></body></html>\n' "$name" >"$rootfs/usr/share/$name/html/index.html"
    rm -f "$rootfs/usr/sbin/$name"
    cat >"$rootfs/usr/sbin/$name" <<EOF
#!/bin/sh
# Stands in for upstream's $name image in critest's specs (scripts/lib/critest-images.sh).
echo \$\$ >/var/run/$name.pid
echo "$name: serving /usr/share/$name/html on :$port" >&2
httpd -f -p $port -h /usr/share/$name/html &
server=\$!
trap 'kill \$server; exit 0' TERM INT
wait \$server
EOF
    chmod 0755 "$rootfs/usr/sbin/$name"
}

# critest_image LAYOUT CONFIG_JSON ROOTFS: an OCI layout of ROOTFS under $IMAGES_DIR/critest/LAYOUT.
critest_image() {
    local layout=$1 config=$2 rootfs=$3
    oci_tar_dir "$rootfs" "$WORK/critest-$layout.tar"
    oci_write_image "$IMAGES_DIR/critest/$layout" "$IMAGE_TAG" "$config" "$WORK/critest-$layout.tar"
}

build_critest() {
    local recipe
    recipe=$(critest_recipe)
    if image_is_current critest "$recipe"; then
        log "critest images are current"
        return
    fi
    local base="$WORK/critest-base" rootfs="$WORK/critest-rootfs" env
    env='"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]'
    rm -rf "$IMAGES_DIR/critest"
    mkdir -p "$IMAGES_DIR/critest"
    critest_busybox_rootfs "$base"
    local list="$IMAGES_DIR/critest/push.list" test user layout
    : >"$list"
    critest_image busybox "{$env,\"Cmd\":[\"sh\"]}" "$base"
    echo "busybox e2e-test-images/busybox 1.29-2" >>"$list"
    # One image per file name; the list maps layouts to the names critest pulls.
    for test in test-image-latest test-image-tag test-image-1 test-image-2 test-image-3 test-image-tags; do
        rm -rf "$rootfs" && cp -a "$base" "$rootfs"
        echo "$test" >"$rootfs/$test"
        critest_image "$test" "{$env,\"Cmd\":[\"sh\"]}" "$rootfs"
    done
    cat >>"$list" <<'EOF'
test-image-latest k8s-staging-cri-tools/test-image-latest latest
test-image-tag k8s-staging-cri-tools/test-image-tag test
test-image-tag k8s-staging-cri-tools/test-image-tag all
test-image-1 k8s-staging-cri-tools/test-image-1 latest
test-image-2 k8s-staging-cri-tools/test-image-2 latest
test-image-3 k8s-staging-cri-tools/test-image-3 latest
test-image-tags k8s-staging-cri-tools/test-image-tags 1
test-image-tags k8s-staging-cri-tools/test-image-tags 2
test-image-tags k8s-staging-cri-tools/test-image-tags 3
EOF
    for user in uid:1002 username:www-data uid-group:1003:1003 username-group:www-data:www-data; do
        layout="test-image-user-${user%%:*}"
        critest_image "$layout" "{$env,\"Cmd\":[\"sh\"],\"User\":\"${user#*:}\"}" "$base"
        echo "$layout k8s-staging-cri-tools/$layout latest" >>"$list"
    done
    rm -rf "$rootfs" && cp -a "$base" "$rootfs"
    echo 'default-user:x:1000:1000::/home/default-user:/bin/sh' >>"$rootfs/etc/passwd"
    printf 'default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n' >>"$rootfs/etc/group"
    mkdir -p "$rootfs/home/default-user"
    critest_image test-image-predefined-group "{$env,\"Cmd\":[\"sh\"],\"User\":\"1000\"}" "$rootfs"
    echo "test-image-predefined-group k8s-staging-cri-tools/test-image-predefined-group latest" >>"$list"

    rm -rf "$rootfs" && cp -a "$base" "$rootfs"
    critest_web_server "$rootfs" nginx 80
    critest_image nginx "{$env,\"Cmd\":[\"nginx\",\"nginx: master process nginx\"],\"ExposedPorts\":{\"80/tcp\":{}}}" "$rootfs"
    echo "nginx e2e-test-images/nginx 1.14-2" >>"$list"
    rm -rf "$rootfs" && cp -a "$base" "$rootfs"
    critest_web_server "$rootfs" nginx 12003
    critest_image hostnet-nginx "{$env,\"Cmd\":[\"nginx\",\"nginx: master process nginx\"],\"ExposedPorts\":{\"12003/tcp\":{}}}" "$rootfs"
    echo "hostnet-nginx k8s-staging-cri-tools/hostnet-nginx-amd64 latest" >>"$list"
    rm -rf "$rootfs" && cp -a "$base" "$rootfs"
    critest_web_server "$rootfs" httpd-foreground 80
    critest_image httpd "{$env,\"Cmd\":[\"httpd-foreground\"],\"ExposedPorts\":{\"80/tcp\":{}}}" "$rootfs"
    echo "httpd e2e-test-images/httpd 2.4.39-4" >>"$list"

    rm -rf "$rootfs" && cp -a "$base" "$rootfs"
    mkdir -p "$rootfs/usr/local/bin"
    # Standard library only: rustc alone builds it, static.
    rustc --edition 2021 -C opt-level=2 -C target-feature=+crt-static \
        --target x86_64-unknown-linux-gnu -o "$rootfs/usr/local/bin/nnp" "$SPRY_ROOT/integration/src/bin/nnp.rs"
    chmod 4755 "$rootfs/usr/local/bin/nnp"
    critest_image nonewprivs "{$env,\"Entrypoint\":[\"/usr/local/bin/nnp\"]}" "$rootfs"
    echo "nonewprivs e2e-test-images/nonewprivs 1.3" >>"$list"
    rm -rf "$base" "$rootfs"
    echo "$recipe" >"$IMAGES_DIR/critest.stamp"
}

# push_critest REGISTRY: every critest image under the repository and tag critest pulls (through the
# containerd mirror of gcr.io/registry.k8s.io that points at REGISTRY).
push_critest() {
    local registry=$1 layout name tag
    while read -r layout name tag; do
        oci_push "$IMAGES_DIR/critest/$layout" "$IMAGE_TAG" "$registry" "$name" "$tag"
    done <"$IMAGES_DIR/critest/push.list"
}
