//! Unit tests of the argv rewriting rules.

use super::*;
use crate::vm::DiskDescription;

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

fn disk(name: &str, node: &str, device: &str, file: &str) -> DiskDescription {
    DiskDescription {
        name: name.into(),
        node_name: node.into(),
        device: device.into(),
        file: file.into(),
        format: "qcow2".into(),
        size: 1 << 30,
        allocated: None,
        read_only: false,
    }
}

fn ctx(names: &[&str]) -> RewriteContext {
    RewriteContext {
        binary: "qemu-system-x86_64".into(),
        dir: PathBuf::from("/st/m1"),
        images: names
            .iter()
            .map(|n| (n.to_string(), PathBuf::from(format!("/st/m1/{n}.raw"))))
            .collect(),
    }
}

#[test]
fn blockdev_disk_chain_is_replaced_by_a_raw_node_with_the_same_name() {
    let vm = VmDescription {
        running: true,
        argv: args(
            "qemu -M pc -m 256 -blockdev driver=file,filename=/src/a.qcow2,node-name=d0-file \
             -blockdev driver=qcow2,file=d0-file,node-name=d0,discard=unmap \
             -device virtio-blk-pci,drive=d0 -serial file:/var/log/vm/serial.log \
             -qmp unix:/run/vm.qmp,server=on,wait=off -daemonize -pidfile /run/vm.pid",
        ),
        machine: Some("pc-i440fx-10.0".into()),
        disks: vec![disk("d0", "d0", "", "/src/a.qcow2")],
    };
    let out = rewrite(&vm, &ctx(&["d0"])).expect("rewrite");
    let expected_blockdev = r#"{"discard":"unmap","driver":"raw","file":{"driver":"file","filename":"/st/m1/d0.raw"},"node-name":"d0"}"#;
    assert_eq!(
        out.argv,
        vec![
            "qemu-system-x86_64",
            "-M",
            "pc-i440fx-10.0",
            "-m",
            "256",
            "-blockdev",
            expected_blockdev,
            "-device",
            "virtio-blk-pci,drive=d0",
            "-serial",
            "file:/st/m1/serial.log",
            "-qmp",
            "unix:/st/m1/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/st/m1/qemu.pid",
            "-sandbox",
            SANDBOX,
            "-S",
            "-incoming",
            "defer",
        ]
    );
    assert_eq!(
        out.relocated,
        vec![(
            "/var/log/vm/serial.log".to_string(),
            PathBuf::from("/st/m1/serial.log")
        )]
    );
}

#[test]
fn drive_is_pointed_at_the_raw_image_and_machine_added() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -drive file=/src/b.img,if=none,id=drv0,format=qcow2,cache=none -device virtio-blk-pci,drive=drv0"),
        machine: Some("pc-q35-7.2".into()),
        disks: vec![disk("drv0", "#block120", "drv0", "/src/b.img")],
    };
    let out = rewrite(&vm, &ctx(&["drv0"])).expect("rewrite");
    assert_eq!(
        out.argv[1..3],
        [
            "-drive",
            "file=/st/m1/drv0.raw,if=none,id=drv0,cache=none,format=raw"
        ]
    );
    assert!(out.argv.windows(2).any(|w| w == ["-machine", "pc-q35-7.2"]));
}

#[test]
fn chardev_paths_move_and_collisions_get_unique_names() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -chardev file,id=c1,path=/a/console.log -chardev socket,id=c2,path=/b/console.log,server=on,wait=off -serial file:/c/qmp.sock"),
        machine: None,
        disks: vec![],
    };
    let out = rewrite(&vm, &ctx(&[])).expect("rewrite");
    assert_eq!(out.argv[2], "file,id=c1,path=/st/m1/console.log");
    assert_eq!(
        out.argv[4],
        "socket,id=c2,path=/st/m1/2-console.log,server=on,wait=off"
    );
    assert_eq!(
        out.argv[6], "file:/st/m1/2-qmp.sock",
        "must not take the agent's socket name"
    );
}

#[test]
fn refusals_name_the_option() {
    let cases = [
        ("qemu -serial stdio", "-serial stdio"),
        ("qemu -snapshot", "-snapshot"),
        ("qemu -hda /x.img", "-hda /x.img"),
        ("qemu -virtfs local,path=/srv", "-virtfs local,path=/srv"),
        (
            "qemu -object memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
            "-object memory-backend-file,id=m,size=1G,mem-path=/dev/hugepages",
        ),
        (
            "qemu -blockdev driver=file,filename=/other.img,node-name=x",
            "-blockdev driver=file,filename=/other.img,node-name=x",
        ),
        (
            "qemu -drive file=/iso.iso,media=cdrom",
            "-drive file=/iso.iso,media=cdrom",
        ),
        ("qemu /bare.img", "/bare.img"),
        ("qemu -m", "-m"),
    ];
    for (argv, option) in cases {
        let vm = VmDescription {
            running: true,
            argv: args(argv),
            machine: None,
            disks: vec![],
        };
        let err = rewrite(&vm, &ctx(&[])).expect_err(argv);
        assert_eq!(err.option, option, "{argv}");
    }
}

#[test]
fn empty_cdrom_stays_and_hotplugged_disk_is_refused() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -drive if=none,id=cd0,media=cdrom"),
        machine: None,
        disks: vec![disk("hot", "hot", "", "/x.raw")],
    };
    let err = rewrite(&vm, &ctx(&["hot"])).expect_err("hot-plugged");
    assert!(err.reason.contains("hot-plugged"), "{err}");
    let vm = VmDescription {
        disks: vec![],
        ..vm
    };
    let out = rewrite(&vm, &ctx(&[])).expect("empty cdrom is fine");
    assert_eq!(out.argv[2], "if=none,id=cd0,media=cdrom");
}

fn vm(argv: &str) -> VmDescription {
    VmDescription {
        running: true,
        argv: args(argv),
        machine: None,
        disks: vec![],
    }
}

/// Each hostile option is refused with the option named and the reason's key words.
#[test]
fn the_allowlist_refuses_what_reaches_the_host() {
    let cases = [
        (
            "-set device.d0.romfile=/etc/shadow",
            "-set",
            "edits other options",
        ),
        (
            "-global e1000.romfile=/etc/shadow",
            "-global",
            "every device",
        ),
        ("-readconfig /etc/qemu.cfg", "-readconfig", "source host"),
        ("-plugin /tmp/evil.so", "-plugin", "shared library"),
        ("-trace file=/tmp/x", "-trace", "host files"),
        ("-pflash /x/vars.fd", "-pflash", "if=pflash"),
        (
            "-fw_cfg name=opt/x,file=/etc/shadow",
            "-fw_cfg",
            "host file",
        ),
        (
            "-device loader,file=/etc/shadow,addr=0x1000",
            "-device loader",
            "host file",
        ),
        (
            r#"-device {"driver":"loader","file":"/etc/shadow"}"#,
            "-device {",
            "host file",
        ),
        (
            "-device e1000,romfile=/etc/shadow",
            "-device e1000",
            "`romfile=`",
        ),
        (
            r#"-device {"driver":"e1000","romfile":"/etc/shadow"}"#,
            "-device {",
            "`romfile=`",
        ),
        (
            "-device vfio-pci,host=01:00.0",
            "-device vfio-pci",
            "host device",
        ),
        (
            "-device virtio-net-pci,netdev=n,vhostfd=3",
            "-device virtio-net",
            "`vhostfd=`",
        ),
        ("-serial /dev/ttyS0", "-serial /dev/ttyS0", "host device"),
        ("-serial tcp::4444,server=on", "-serial tcp", "network port"),
        ("-serial stdio", "-serial stdio", "no terminal"),
        ("-chardev stdio,id=c", "-chardev stdio", "no terminal"),
        (
            "-chardev serial,id=c,path=/dev/ttyS0",
            "-chardev serial",
            "only file",
        ),
        (
            "-chardev pipe,id=c,path=/tmp/p",
            "-chardev pipe",
            "only file",
        ),
        (
            "-chardev socket,id=c,host=0.0.0.0,port=4444,server=on",
            "-chardev socket",
            "TCP",
        ),
        (
            "-chardev file,id=c,path=/tmp/a,input-path=/etc/shadow",
            "-chardev file",
            "`input-path=`",
        ),
        ("-chardev socket,id=c,fd=3", "-chardev socket", "`fd=`"),
        (
            "-netdev tap,id=n,script=/tmp/marker-script",
            "-netdev tap",
            "no mapping of host networks",
        ),
        ("-netdev bridge,id=n,br=br0", "-netdev bridge", "no mapping"),
        (
            r#"-netdev {"type":"tap","id":"n"}"#,
            "-netdev {",
            "no mapping",
        ),
        (
            "-netdev user,id=n,hostfwd=tcp::2222-:22",
            "-netdev user",
            "`hostfwd`",
        ),
        (
            "-netdev user,id=n,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh",
            "-netdev user",
            "`guestfwd`",
        ),
        ("-netdev user,id=n,tftp=/srv", "-netdev user", "`tftp`"),
        ("-netdev user,id=n,smb=/srv", "-netdev user", "`smb`"),
        (
            "-netdev socket,id=n,listen=:1234",
            "-netdev socket",
            "host sockets",
        ),
        ("-nic tap,model=virtio-net-pci", "-nic tap", "no mapping"),
        ("-net tap,ifname=tap0", "-net tap", "no mapping"),
        ("-display gtk", "-display gtk", "-display none"),
        ("-display vnc=:0", "-display vnc=:0", "-display none"),
        ("-vnc :0", "-vnc :0", "TCP VNC"),
        ("-vnc unix:/tmp/v,tls-creds=t", "-vnc unix:", "`tls-creds`"),
        ("-spice port=5900", "-spice", "without a display"),
        (
            "-drive if=none,id=x,file.driver=file,file.filename=/etc/shadow",
            "-drive",
            "`file.driver=`",
        ),
        (
            "-drive if=none,id=x,driver=nbd,server.host=h",
            "-drive",
            "opens storage",
        ),
        ("-drive /etc/shadow", "-drive /etc/shadow", "opens storage"),
        (
            "-blockdev driver=nbd,node-name=n,server.type=unix,server.path=/run/s",
            "-blockdev",
            "not one of the VM's disks",
        ),
        (
            "-blockdev driver=vvfat,node-name=n,dir=/etc",
            "-blockdev",
            "not one of the VM's disks",
        ),
        ("-blockdev {bad", "-blockdev {bad", "JSON"),
        (
            "-object secret,id=s,file=/etc/shadow",
            "-object secret",
            "`file=`",
        ),
        (
            "-object rng-random,id=r,filename=/etc/shadow",
            "-object rng-random",
            "`filename=`",
        ),
        (
            "-object tls-creds-x509,id=t,dir=/etc/pki",
            "-object tls-creds-x509",
            "object type",
        ),
        (
            "-machine pc,dumpdtb=/etc/passwd",
            "-machine pc",
            "`dumpdtb=`",
        ),
        (
            "-machine pc,kernel=/boot/vmlinuz",
            "-machine pc",
            "`kernel=`",
        ),
        (
            "-audiodev wav,id=a,path=/tmp/a.wav",
            "-audiodev wav",
            "`none`",
        ),
        ("-boot menu=on,splash=/etc/shadow", "-boot", "`splash=`"),
        ("-smbios file=/etc/shadow", "-smbios", "`file=`"),
        ("-k /etc/shadow", "-k /etc/shadow", "not a path"),
        ("-runas nobody", "-runas", "agent decides"),
        ("-gdb tcp::1234", "-gdb", "debugger"),
        ("-s", "-s", "debugger"),
        ("-add-fd fd=3,set=1", "-add-fd", "file descriptors"),
        ("-usbdevice host:1234:5678", "-usbdevice", "tablet"),
        (
            "-frobnicate x",
            "-frobnicate x",
            "does not know this option",
        ),
        (
            "-device e1000,romfile=,romfile=/etc/shadow",
            "-device",
            "given twice",
        ),
    ];
    for (argv, option, words) in cases {
        let err = rewrite(&vm(&format!("qemu {argv}")), &ctx(&[])).expect_err(argv);
        assert!(err.option.starts_with(option), "{argv}: {err}");
        assert!(err.to_string().contains(words), "{argv}: {err}");
        assert!(!err.to_string().contains('\n'), "{argv}: one line");
    }
}

/// What ferry can move keeps working, in both spellings.
#[test]
fn the_allowlist_accepts_what_it_can_move() {
    let ok = [
        "-netdev user,id=n0,net=10.0.2.0/24,hostname=g -device virtio-net-pci,netdev=n0",
        r#"-netdev {"type":"user","id":"n0"} -device {"driver":"virtio-net-pci","netdev":"n0"}"#,
        "-nic user,model=virtio-net-pci -nic none -net nic,model=e1000 -net user",
        "-object rng-random,id=r,filename=/dev/urandom -device virtio-rng-pci,rng=r",
        r#"-object {"qom-type":"memory-backend-ram","id":"m","size":268435456}"#,
        "-device e1000,romfile= -display none -vnc none -usbdevice tablet",
        "-chardev null,id=c0 -chardev pty,id=c1 -chardev ringbuf,id=c2 -serial null -serial pty",
        "-chardev socket,id=m,path=/run/x.sock,server=on,wait=off -mon chardev=m",
        "-audiodev none,id=a -accel tcg -smp 2 -m 256 -rtc base=utc -name g -msg timestamp=on",
        "-drive if=none,id=cd0,media=cdrom -blockdev driver=null-co,node-name=n",
        "-monitor stdio -qmp tcp::4444 -sandbox on -daemonize -pidfile /x -L /etc",
    ];
    for argv in ok {
        rewrite(&vm(&format!("qemu {argv}")), &ctx(&[])).unwrap_or_else(|e| panic!("{argv}: {e}"));
    }
    let out = rewrite(
        &vm("qemu -L /etc -vnc unix:/run/vnc.sock,share=ignore"),
        &ctx(&[]),
    )
    .expect("vnc");
    assert!(
        !out.argv.contains(&"-L".to_string()),
        "the source's -L is dropped"
    );
    assert_eq!(out.argv[2], "unix:/st/m1/vnc.sock,share=ignore");
}

/// The test guest's own command line (what `ferry demo` and the end-to-end tests migrate).
#[test]
fn the_test_guest_command_line_is_accepted() {
    let images = ferry_testkit::GuestImages {
        kernel: PathBuf::from("/srv/g/vmlinuz"),
        initrd: PathBuf::from("/srv/g/initrd.img"),
    };
    let spec = ferry_testkit::GuestSpec::new(images)
        .disk(ferry_testkit::DiskSpec::new(
            "/src/a.raw",
            ferry_testkit::ImageFormat::Raw,
            "vda",
        ))
        .disk(ferry_testkit::DiskSpec::new(
            "/src/b.qcow2",
            ferry_testkit::ImageFormat::Qcow2,
            "vdb",
        ));
    let mut argv = vec!["qemu-system-x86_64".to_string()];
    argv.extend(
        spec.qemu_args(Path::new("/src/qmp.sock"), Path::new("/src/serial.log"))
            .expect("args")
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned()),
    );
    let vm = VmDescription {
        running: true,
        argv: argv.clone(),
        machine: Some("pc-i440fx-10.0".into()),
        disks: vec![
            disk("vda", "vda", "", "/src/a.raw"),
            disk("vdb", "vdb", "", "/src/b.qcow2"),
        ],
    };
    let out = rewrite(&vm, &ctx(&["vda", "vdb"])).expect("the test guest migrates");
    assert!(out.argv.contains(&"file:/st/m1/serial.log".to_string()));
    assert_eq!(
        host_files(&argv),
        vec![
            ("kernel".to_string(), "/srv/g/vmlinuz".to_string()),
            ("initrd".to_string(), "/srv/g/initrd.img".to_string())
        ]
    );
}

/// A relocated file never takes a disk image's name, even when it comes first.
#[test]
fn relocated_files_never_take_an_image_name() {
    let vm = VmDescription {
        running: true,
        argv: args("qemu -serial file:/x/d0.raw -D /y/argv -blockdev driver=raw,node-name=d0,file.driver=file,file.filename=/s/d0.img"),
        machine: None,
        disks: vec![disk("d0", "d0", "", "/s/d0.img")],
    };
    let out = rewrite(&vm, &ctx(&["d0"])).expect("rewrite");
    assert_eq!(out.argv[2], "file:/st/m1/2-d0.raw");
    assert_eq!(out.argv[4], "/st/m1/2-argv");
}

/// The resolved machine type comes from the source too: a name, never extra keys.
#[test]
fn the_machine_type_is_only_a_name() {
    for machine in ["pc,kernel=/etc/shadow", "pc firmware", ""] {
        let vm = VmDescription {
            machine: Some(machine.into()),
            ..vm("qemu -m 64")
        };
        let err = rewrite(&vm, &ctx(&[])).expect_err(machine);
        assert!(err.to_string().contains("machine type"), "{err}");
    }
    let vm = VmDescription {
        machine: Some("pc-q35-10.0".into()),
        ..vm("qemu -m 64")
    };
    rewrite(&vm, &ctx(&[])).expect("a real machine type");
}

/// Firmware flash travels as a disk: a `-drive if=pflash` QEMU reported is pointed at its image.
#[test]
fn pflash_drives_travel_as_disks() {
    let vm = VmDescription {
        running: true,
        argv: args(
            "qemu -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd",
        ),
        machine: None,
        disks: vec![disk(
            "pflash0",
            "#block1",
            "pflash0",
            "/usr/share/OVMF/OVMF_CODE.fd",
        )],
    };
    let out = rewrite(&vm, &ctx(&["pflash0"])).expect("rewrite");
    assert_eq!(
        out.argv[2],
        "if=pflash,readonly=on,file=/st/m1/pflash0.raw,format=raw"
    );
}

/// A relocated file never takes the agent's journal (or its temporary file): QEMU would write
/// over the record of who owns the VM.
#[test]
fn relocated_files_never_take_the_journal() {
    let vm = vm("qemu -serial file:/x/journal.json -chardev file,id=c1,path=/y/journal.json.tmp");
    let out = rewrite(&vm, &ctx(&[])).expect("rewrite");
    for arg in &out.argv {
        assert!(
            !arg.ends_with("/m1/journal.json") && !arg.ends_with("/m1/journal.json.tmp"),
            "{arg} takes the journal's name"
        );
    }
}
