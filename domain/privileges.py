"""The vSphere privileges kubegate needs, as the product document lists them, with their ids.

Two roles: the root-level role (applied to the vCenter root and the datacenter, no
propagation) and the cluster role (applied with propagation to the compute cluster,
resource pool, datastore, network, VM folder and template).
"""

from __future__ import annotations

from typing import Final

#: (privilege id, the name vSphere's role editor shows)
ROOT_LEVEL_ROLE: Final[tuple[tuple[str, str], ...]] = (
    ("Datastore.Browse", "Datastore > Browse datastore"),
    ("Host.Config.Storage", "Host > Configuration > Storage partition configuration"),
    ("InventoryService.Tagging.CreateTag", "vSphere Tagging > Create vSphere Tag"),
    ("InventoryService.Tagging.EditTag", "vSphere Tagging > Edit vSphere Tag"),
    ("Network.Assign", "Network > Assign network"),
    ("Sessions.ValidateSession", "Sessions > Validate session"),
    ("StorageProfile.View", "Profile-driven storage > Profile-driven storage view"),
    ("StorageViews.View", "Storage views > View"),
)

_VM = "Virtual machine"
CLUSTER_ROLE: Final[tuple[tuple[str, str], ...]] = (
    ("Datastore.AllocateSpace", "Datastore > Allocate space"),
    ("Datastore.Browse", "Datastore > Browse datastore"),
    ("Datastore.FileManagement", "Datastore > Low level file operations"),
    ("Datastore.DeleteFile", "Datastore > Remove file"),
    ("Datastore.UpdateVirtualMachineFiles", "Datastore > Update virtual machine files"),
    ("Datastore.UpdateVirtualMachineMetadata", "Datastore > Update virtual machine metadata"),
    ("Folder.Create", "Folder > Create folder"),
    ("Folder.Delete", "Folder > Delete folder"),
    ("Folder.Move", "Folder > Move folder"),
    ("Folder.Rename", "Folder > Rename folder"),
    ("Host.Local.ReconfigVM", "Host > Local operations > Reconfigure virtual machine"),
    ("InventoryService.Tagging.AttachTag", "vSphere Tagging > Assign or Unassign vSphere Tag"),
    ("InventoryService.Tagging.CreateTag", "vSphere Tagging > Create vSphere Tag"),
    ("InventoryService.Tagging.DeleteTag", "vSphere Tagging > Delete vSphere Tag"),
    ("InventoryService.Tagging.EditTag", "vSphere Tagging > Edit vSphere Tag"),
    ("Network.Assign", "Network > Assign network"),
    ("Resource.ApplyRecommendation", "Resource > Apply recommendation"),
    ("Resource.AssignVMToPool", "Resource > Assign virtual machine to resource pool"),
    ("Resource.ColdMigrate", "Resource > Migrate powered off virtual machine"),
    ("Resource.HotMigrate", "Resource > Migrate powered on virtual machine"),
    ("Resource.QueryVMotion", "Resource > Query vMotion"),
    ("Sessions.ValidateSession", "Sessions > Validate session"),
    ("StorageProfile.View", "Profile-driven storage > Profile-driven storage view"),
    ("StorageViews.ConfigureService", "Storage views > Configure service"),
    ("Task.Create", "Tasks > Create task"),
    ("Task.Update", "Tasks > Update task"),
    ("VApp.ExtractOvfEnvironment", "vApp > View OVF environment"),
    ("VApp.ApplicationConfig", "vApp > vApp application configuration"),
    ("VApp.InstanceConfig", "vApp > vApp instance configuration"),
    ("VirtualMachine.Config.DiskLease", f"{_VM} > Change Configuration > Acquire disk lease"),
    ("VirtualMachine.Config.AddExistingDisk", f"{_VM} > Change Configuration > Add existing disk"),
    ("VirtualMachine.Config.AddNewDisk", f"{_VM} > Change Configuration > Add new disk"),
    (
        "VirtualMachine.Config.AddRemoveDevice",
        f"{_VM} > Change Configuration > Add or remove device",
    ),
    (
        "VirtualMachine.Config.AdvancedConfig",
        f"{_VM} > Change Configuration > Advanced configuration",
    ),
    ("VirtualMachine.Config.CPUCount", f"{_VM} > Change Configuration > Change CPU count"),
    ("VirtualMachine.Config.Memory", f"{_VM} > Change Configuration > Change Memory"),
    ("VirtualMachine.Config.Settings", f"{_VM} > Change Configuration > Change Settings"),
    (
        "VirtualMachine.Config.SwapPlacement",
        f"{_VM} > Change Configuration > Change Swapfile placement",
    ),
    ("VirtualMachine.Config.Resource", f"{_VM} > Change Configuration > Change resource"),
    (
        "VirtualMachine.Config.HostUSBDevice",
        f"{_VM} > Change Configuration > Configure Host USB device",
    ),
    ("VirtualMachine.Config.RawDevice", f"{_VM} > Change Configuration > Configure Raw device"),
    ("VirtualMachine.Config.ManagedBy", f"{_VM} > Change Configuration > Configure managedBy"),
    (
        "VirtualMachine.Config.MksControl",
        f"{_VM} > Change Configuration > Display connection settings",
    ),
    ("VirtualMachine.Config.DiskExtend", f"{_VM} > Change Configuration > Extend virtual disk"),
    ("VirtualMachine.Config.EditDevice", f"{_VM} > Change Configuration > Modify device settings"),
    (
        "VirtualMachine.Config.QueryFTCompatibility",
        f"{_VM} > Change Configuration > Query Fault Tolerance compatibility",
    ),
    (
        "VirtualMachine.Config.QueryUnownedFiles",
        f"{_VM} > Change Configuration > Query unowned files",
    ),
    ("VirtualMachine.Config.ReloadFromPath", f"{_VM} > Change Configuration > Reload from path"),
    ("VirtualMachine.Config.RemoveDisk", f"{_VM} > Change Configuration > Remove disk"),
    ("VirtualMachine.Config.Rename", f"{_VM} > Change Configuration > Rename"),
    (
        "VirtualMachine.Config.ResetGuestInfo",
        f"{_VM} > Change Configuration > Reset guest information",
    ),
    ("VirtualMachine.Config.Annotation", f"{_VM} > Change Configuration > Set annotation"),
    (
        "VirtualMachine.Config.ChangeTracking",
        f"{_VM} > Change Configuration > Toggle disk change tracking",
    ),
    (
        "VirtualMachine.Config.ToggleForkParent",
        f"{_VM} > Change Configuration > Toggle fork parent",
    ),
    (
        "VirtualMachine.Config.UpgradeVirtualHardware",
        f"{_VM} > Change Configuration > Upgrade virtual machine compatibility",
    ),
    (
        "VirtualMachine.Inventory.CreateFromExisting",
        f"{_VM} > Edit Inventory > Create from existing",
    ),
    ("VirtualMachine.Inventory.Create", f"{_VM} > Edit Inventory > Create new"),
    ("VirtualMachine.Inventory.Move", f"{_VM} > Edit Inventory > Move"),
    ("VirtualMachine.Inventory.Register", f"{_VM} > Edit Inventory > Register"),
    ("VirtualMachine.Inventory.Delete", f"{_VM} > Edit Inventory > Remove"),
    ("VirtualMachine.Inventory.Unregister", f"{_VM} > Edit Inventory > Unregister"),
    (
        "VirtualMachine.GuestOperations.ModifyAliases",
        f"{_VM} > Guest operations > Guest operation alias modification",
    ),
    (
        "VirtualMachine.GuestOperations.QueryAliases",
        f"{_VM} > Guest operations > Guest operation alias query",
    ),
    (
        "VirtualMachine.GuestOperations.Modify",
        f"{_VM} > Guest operations > Guest operation modifications",
    ),
    (
        "VirtualMachine.GuestOperations.Execute",
        f"{_VM} > Guest operations > Guest operation program execution",
    ),
    ("VirtualMachine.GuestOperations.Query", f"{_VM} > Guest operations > Guest operation queries"),
    ("VirtualMachine.Interact.ConsoleInteract", f"{_VM} > Interaction > Console interaction"),
    ("VirtualMachine.Interact.PowerOff", f"{_VM} > Interaction > Power off"),
    ("VirtualMachine.Interact.PowerOn", f"{_VM} > Interaction > Power on"),
    ("VirtualMachine.Provisioning.DiskRandomAccess", f"{_VM} > Provisioning > Allow disk access"),
    ("VirtualMachine.Provisioning.FileRandomAccess", f"{_VM} > Provisioning > Allow file access"),
    (
        "VirtualMachine.Provisioning.DiskRandomRead",
        f"{_VM} > Provisioning > Allow read-only disk access",
    ),
    (
        "VirtualMachine.Provisioning.GetVmFiles",
        f"{_VM} > Provisioning > Allow virtual machine download",
    ),
    (
        "VirtualMachine.Provisioning.PutVmFiles",
        f"{_VM} > Provisioning > Allow virtual machine files upload",
    ),
    ("VirtualMachine.Provisioning.CloneTemplate", f"{_VM} > Provisioning > Clone template"),
    ("VirtualMachine.Provisioning.Clone", f"{_VM} > Provisioning > Clone virtual machine"),
    (
        "VirtualMachine.Provisioning.CreateTemplateFromVM",
        f"{_VM} > Provisioning > Create template from virtual machine",
    ),
    ("VirtualMachine.Provisioning.Customize", f"{_VM} > Provisioning > Customize guest"),
    ("VirtualMachine.Provisioning.DeployTemplate", f"{_VM} > Provisioning > Deploy template"),
    ("VirtualMachine.Provisioning.MarkAsTemplate", f"{_VM} > Provisioning > Mark as template"),
    ("VirtualMachine.Provisioning.MarkAsVM", f"{_VM} > Provisioning > Mark as virtual machine"),
    (
        "VirtualMachine.Provisioning.ModifyCustSpecs",
        f"{_VM} > Provisioning > Modify customization specification",
    ),
    ("VirtualMachine.Provisioning.PromoteDisks", f"{_VM} > Provisioning > Promote disks"),
    (
        "VirtualMachine.Provisioning.ReadCustSpecs",
        f"{_VM} > Provisioning > Read customization specifications",
    ),
    ("VirtualMachine.Namespace.Event", f"{_VM} > Service configuration > Allow notifications"),
    (
        "VirtualMachine.Namespace.EventNotify",
        f"{_VM} > Service configuration > Allow polling of global event notifications",
    ),
    (
        "VirtualMachine.Namespace.Management",
        f"{_VM} > Service configuration > Manage service configurations",
    ),
    (
        "VirtualMachine.Namespace.ModifyContent",
        f"{_VM} > Service configuration > Modify service configuration",
    ),
    (
        "VirtualMachine.Namespace.Query",
        f"{_VM} > Service configuration > Query service configurations",
    ),
    (
        "VirtualMachine.Namespace.ReadContent",
        f"{_VM} > Service configuration > Read service configuration",
    ),
    ("VirtualMachine.State.CreateSnapshot", f"{_VM} > Snapshot management > Create snapshot"),
    ("VirtualMachine.State.RemoveSnapshot", f"{_VM} > Snapshot management > Remove snapshot"),
    ("VirtualMachine.State.RenameSnapshot", f"{_VM} > Snapshot management > Rename snapshot"),
    ("VirtualMachine.State.RevertToSnapshot", f"{_VM} > Snapshot management > Revert to snapshot"),
    (
        "VirtualMachine.Hbr.ConfigureReplication",
        f"{_VM} > vSphere Replication > Configure replication",
    ),
    ("VirtualMachine.Hbr.ReplicaManagement", f"{_VM} > vSphere Replication > Manage replication"),
    ("VirtualMachine.Hbr.MonitorReplication", f"{_VM} > vSphere Replication > Monitor replication"),
)

#: Which role each placement object must carry.
ROLE_OF_OBJECT: Final[dict[str, str]] = {
    "root": "root-level",
    "datacenter": "root-level",
    "compute_cluster": "cluster",
    "resource_pool": "cluster",
    "datastore": "cluster",
    "network": "cluster",
    "folder": "cluster",
    "template": "cluster",
}

ROLES: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "root-level": ROOT_LEVEL_ROLE,
    "cluster": CLUSTER_ROLE,
}

DISPLAY_NAME: Final[dict[str, str]] = dict(ROOT_LEVEL_ROLE + CLUSTER_ROLE)


def privilege_ids(role: str) -> list[str]:
    """Privilege ids of a role, in document order."""
    return [pid for pid, _ in ROLES[role]]


def all_privilege_ids() -> list[str]:
    """Every privilege id either role names, without duplicates."""
    return list(DISPLAY_NAME)
