package main

import (
	"bufio"
	"context"
	"fmt"
	"io/ioutil"
	"log"
	"os"
	"sort"
	"strings"

	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

// simState is the simulator model plus what the wrapper added to it.
type simState struct {
	model        *simulator.Model
	client       *vim25.Client // in-process client (internal session)
	templatePath string
	tempDirs     []string
}

func (s *simState) cleanup() {
	if s.model != nil {
		s.model.Remove()
	}
	for _, d := range s.tempDirs {
		_ = os.RemoveAll(d)
	}
}

func buildInventory(o *options) (*simState, error) {
	m := simulator.VPX()
	m.Datacenter = o.Datacenters
	m.Cluster = o.Clusters
	m.ClusterHost = o.Hosts
	m.Host = 0 // no standalone hosts
	m.Datastore = o.Datastores
	m.Portgroup = o.Networks
	m.Pool = o.Pools
	m.Machine = o.VMs
	m.Autostart = true
	m.DelayConfig = simulator.DelayConfig{} // set after the inventory is built

	about := &m.ServiceContent.About
	about.Version = o.Version
	about.Build = o.Build
	about.FullName = fmt.Sprintf("VMware vCenter Server %s build-%s", o.Version, o.Build)
	about.ApiVersion = o.APIVersion
	if parts := strings.Split(o.Version, "."); len(parts) >= 2 {
		about.LicenseProductVersion = parts[0] + ".0"
	}

	if err := m.Create(); err != nil {
		return nil, fmt.Errorf("creating model: %v", err)
	}
	s := &simState{model: m}

	c, err := internalClient(m.Service)
	if err != nil {
		s.cleanup()
		return nil, err
	}
	s.client = c

	steps := []func() error{
		func() error { return s.addLocalDatastores(o.LocalDatastores) },
		s.fixDatastoreMounts,
		func() error { return s.configureNTP(o.NTP, o.NoNTPHosts) },
		func() error { return s.disableDRS(o.NoDRS) },
		func() error { return s.createTemplate(o.Template) },
	}
	for _, step := range steps {
		if err := step(); err != nil {
			s.cleanup()
			return nil, err
		}
	}
	return s, nil
}

func entityName(ref types.ManagedObjectReference) string {
	switch x := simulator.Map.Get(ref).(type) {
	case *simulator.DistributedVirtualPortgroup:
		return x.Name
	case *simulator.DistributedVirtualSwitch:
		return x.Name
	case *mo.Network:
		return x.Name
	case *mo.OpaqueNetwork:
		return x.Name
	case mo.Entity:
		return x.Entity().Name
	}
	return ""
}

func hostsByName() map[string]*simulator.HostSystem {
	hosts := map[string]*simulator.HostSystem{}
	for _, e := range simulator.Map.All("HostSystem") {
		if h, ok := e.(*simulator.HostSystem); ok {
			hosts[h.Name] = h
		}
	}
	return hosts
}

// addLocalDatastores creates NAME@HOST datastores, each mounted on that single host.
func (s *simState) addLocalDatastores(specs []string) error {
	ctx := context.Background()
	hosts := hostsByName()
	for _, spec := range specs {
		i := strings.LastIndex(spec, "@")
		if i <= 0 || i == len(spec)-1 {
			return fmt.Errorf("invalid -local-datastore %q (want NAME@HOSTNAME)", spec)
		}
		name, hostName := spec[:i], spec[i+1:]
		h, ok := hosts[hostName]
		if !ok {
			return fmt.Errorf("-local-datastore %q: no host named %q", spec, hostName)
		}
		dir, err := ioutil.TempDir("", "kubegate-vcsim-"+name+"-")
		if err != nil {
			return err
		}
		s.tempDirs = append(s.tempDirs, dir)
		dss, err := object.NewHostSystem(s.client, h.Reference()).ConfigManager().DatastoreSystem(ctx)
		if err != nil {
			return err
		}
		if _, err := dss.CreateLocalDatastore(ctx, name, dir); err != nil {
			return fmt.Errorf("-local-datastore %q: %v", spec, err)
		}
	}
	return nil
}

// fixDatastoreMounts makes datastore.host list a mount for every host whose host.datastore
// contains the datastore. The 0.24 model creates one Datastore object per host with the same
// moref, so only the last host's mount survives otherwise.
func (s *simState) fixDatastoreMounts() error {
	hosts := simulator.Map.All("HostSystem")
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Entity().Name < hosts[j].Entity().Name })
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok {
			continue
		}
		var mounts []types.DatastoreHostMount
		for _, he := range hosts {
			h := he.(*simulator.HostSystem)
			for _, ref := range h.Datastore {
				if ref == ds.Self {
					mounts = append(mounts, types.DatastoreHostMount{
						Key: h.Self,
						MountInfo: types.HostMountInfo{
							Path:       ds.Info.GetDatastoreInfo().Url,
							AccessMode: string(types.HostMountModeReadWrite),
							Mounted:    types.NewBool(true),
							Accessible: types.NewBool(true),
						},
					})
					break
				}
			}
		}
		ds.Host = mounts
		ds.Summary.Accessible = true
		ds.Summary.MultipleHostAccess = types.NewBool(len(mounts) > 1)
	}
	return nil
}

// disableDRS turns DRS off in the named compute clusters (vcsim enables it everywhere, and its
// ReconfigureComputeResource_Task does not change it).
func (s *simState) disableDRS(names []string) error {
	for _, name := range names {
		found := false
		for _, obj := range simulator.Map.All("ClusterComputeResource") {
			cluster, ok := obj.(*simulator.ClusterComputeResource)
			if !ok || cluster.Name != name {
				continue
			}
			if config, ok := cluster.ConfigurationEx.(*types.ClusterConfigInfoEx); ok {
				config.DrsConfig.Enabled = types.NewBool(false)
			}
			found = true
		}
		if !found {
			return fmt.Errorf("-no-drs: no compute cluster named %q", name)
		}
	}
	return nil
}

// configureNTP sets config.dateTimeInfo.ntpConfig.server on every host.
func (s *simState) configureNTP(ntp string, noNTP []string) error {
	var servers []string
	for _, srv := range strings.Split(ntp, ",") {
		if srv = strings.TrimSpace(srv); srv != "" {
			servers = append(servers, srv)
		}
	}
	hosts := hostsByName()
	skip := map[string]bool{}
	for _, name := range noNTP {
		if _, ok := hosts[name]; !ok {
			return fmt.Errorf("-no-ntp-host: no host named %q", name)
		}
		skip[name] = true
	}
	for name, h := range hosts {
		if h.Config == nil {
			h.Config = &types.HostConfigInfo{Host: h.Self}
		}
		if h.Config.DateTimeInfo == nil {
			h.Config.DateTimeInfo = &types.HostDateTimeInfo{
				TimeZone: types.HostDateTimeSystemTimeZone{
					Key:         "UTC",
					Name:        "UTC",
					Description: "UTC",
					GmtOffset:   0,
				},
			}
		}
		cfg := &types.HostNtpConfig{}
		if !skip[name] && len(servers) > 0 {
			cfg.Server = append([]string(nil), servers...)
		}
		h.Config.DateTimeInfo.NtpConfig = cfg
	}
	return nil
}

func firstDatacenter() (*simulator.Datacenter, error) {
	var dcs []*simulator.Datacenter
	for _, e := range simulator.Map.All("Datacenter") {
		if dc, ok := e.(*simulator.Datacenter); ok {
			dcs = append(dcs, dc)
		}
	}
	if len(dcs) == 0 {
		return nil, fmt.Errorf("no datacenter")
	}
	sort.Slice(dcs, func(i, j int) bool { return dcs[i].Name < dcs[j].Name })
	return dcs[0], nil
}

// createTemplate creates the VM template in <dc>/vm/templates.
func (s *simState) createTemplate(name string) error {
	if name == "" {
		return nil
	}
	ctx := context.Background()
	dcObj, err := firstDatacenter()
	if err != nil {
		return err
	}
	dcName := dcObj.Name
	finder := find.NewFinder(s.client, true)
	dc, err := finder.Datacenter(ctx, "/"+dcName)
	if err != nil {
		return err
	}
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	templates, err := folders.VmFolder.CreateFolder(ctx, "templates")
	if err != nil {
		return fmt.Errorf("creating templates folder: %v", err)
	}
	clusterName := dcName + "_C0"
	cluster, err := finder.ClusterComputeResource(ctx, "/"+dcName+"/host/"+clusterName)
	if err != nil {
		return err
	}
	pool, err := cluster.ResourcePool(ctx)
	if err != nil {
		return err
	}
	hosts, err := cluster.Hosts(ctx)
	if err != nil || len(hosts) == 0 {
		return fmt.Errorf("cluster %s has no hosts", clusterName)
	}
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].Name() < hosts[j].Name() })
	host := hosts[0]

	ds, err := finder.Datastore(ctx, "LocalDS_0")
	if err != nil {
		return err
	}
	network, err := finder.Network(ctx, "VM Network")
	if err != nil {
		return err
	}
	backing, err := network.EthernetCardBackingInfo(ctx)
	if err != nil {
		return err
	}

	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	if err != nil {
		return err
	}
	devices = append(devices, scsi)
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), ds.Reference(), "")
	disk.CapacityInKB = 20 * 1024 * 1024
	disk.CapacityInBytes = 20 * 1024 * 1024 * 1024
	devices = append(devices, disk)
	nic, err := devices.CreateEthernetCard("vmxnet3", backing)
	if err != nil {
		return err
	}
	devices = append(devices, nic)
	deviceChange, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	if err != nil {
		return err
	}

	spec := types.VirtualMachineConfigSpec{
		Name:              name,
		GuestId:           string(types.VirtualMachineGuestOsIdentifierUbuntu64Guest),
		NumCPUs:           2,
		NumCoresPerSocket: 1,
		MemoryMB:          4096,
		Annotation:        "kubegate node template (vcsim)",
		Files:             &types.VirtualMachineFileInfo{VmPathName: "[LocalDS_0]"},
		DeviceChange:      deviceChange,
	}
	task, err := templates.CreateVM(ctx, spec, pool, host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return fmt.Errorf("creating template VM: %v", err)
	}
	vm := object.NewVirtualMachine(s.client, info.Result.(types.ManagedObjectReference))
	if err := vm.MarkAsTemplate(ctx); err != nil {
		return fmt.Errorf("marking template: %v", err)
	}
	s.templatePath = "/" + dcName + "/vm/templates/" + name
	return nil
}

// printInventory writes "TYPE PATH" for every managed entity, sorted by path.
func printInventory(w *bufio.Writer, c *vim25.Client) error {
	type node struct {
		ref    types.ManagedObjectReference
		name   string
		parent *types.ManagedObjectReference
	}
	entities := simulator.Map.All("")
	var objects []types.ObjectSpec
	kinds := map[string]bool{}
	for _, e := range entities {
		ref := e.Reference()
		objects = append(objects, types.ObjectSpec{Obj: ref})
		kinds[ref.Type] = true
	}
	var props []types.PropertySpec
	for kind := range kinds {
		props = append(props, types.PropertySpec{Type: kind, PathSet: []string{"name", "parent"}})
	}
	req := types.RetrieveProperties{
		This:    c.ServiceContent.PropertyCollector,
		SpecSet: []types.PropertyFilterSpec{{ObjectSet: objects, PropSet: props}},
	}
	res, err := methods.RetrieveProperties(context.Background(), c, &req)
	if err != nil {
		return err
	}
	nodes := map[types.ManagedObjectReference]*node{}
	for _, oc := range res.Returnval {
		n := &node{ref: oc.Obj}
		for _, p := range oc.PropSet {
			switch p.Name {
			case "name":
				n.name, _ = p.Val.(string)
			case "parent":
				if ref, ok := p.Val.(types.ManagedObjectReference); ok {
					n.parent = &ref
				}
			}
		}
		nodes[oc.Obj] = n
	}
	type line struct{ kind, path string }
	var lines []line
	for _, n := range nodes {
		if n.parent == nil {
			continue // root folder
		}
		var parts []string
		cur := n
		for cur != nil && cur.parent != nil {
			parts = append([]string{cur.name}, parts...)
			cur = nodes[*cur.parent]
		}
		lines = append(lines, line{n.ref.Type, "/" + strings.Join(parts, "/")})
	}
	sort.Slice(lines, func(i, j int) bool { return lines[i].path < lines[j].path })
	for _, l := range lines {
		fmt.Fprintf(w, "%s %s\n", l.kind, l.path)
	}
	if len(lines) == 0 {
		log.Printf("inventory is empty")
	}
	return nil
}
